# Issue 4, session 14, call 3: the complete SSA benchmark of main (every size 8k-128k, both configs, the ragged batch,
# the odd layer, the whole module), one run, for the README table: bench_ssa.py with its defaults.
source scripts/gpu/_prelude.sh
mkdir -p $OUT/full
timeout 560 python3 benchmarks/bench_ssa.py --layouts $L --out $OUT/full --commit "${COMMIT}" 2>&1 \
    | grep -v '^{' | grep -v Warn | tail -20 | cut -c1-300
grep '^| v1' $OUT/full/*.md | cut -c1-250
el bench

# Issue 4, session 15, call 5: the README's SSA table from main c7a4b0e: bench_ssa.py v1.1 at N = 134k alone (the
# seed-0 inputs of that size, as in session 14's table), the whole layer rows included, then the kernels of the
# selection forward and of the whole forward (profile).
source scripts/gpu/_prelude.sh
mkdir -p $OUT/bench
python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --no-batch --no-shifted --out $OUT/bench \
    --commit "${COMMIT}" 2>&1 | grep '^| v1\|^SSA\|^Selection\|^The whole\|module' | cut -c1-400
el bench
python3 scripts/gpu/ssa_kernel_profile.py --layouts $L --rows 40 2>&1 | grep '^|\|^#' | cut -c1-170 > $OUT/profile.md
head -8 $OUT/profile.md
el profile

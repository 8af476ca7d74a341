# Issue 4, session 17, call 4: ssa15_7.sh's benchmark part alone on the new default (call 3 ran out of its 600 s in
# the GPU tests): bench_ssa.py v1.1 at 134k alone (the README's table), the selection's kernels (profile), the
# complete benchmark. COMMIT=<sha> bash scripts/gpu/ssa17_4.sh
source scripts/gpu/_prelude.sh
mkdir -p $OUT/main $OUT/full
python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --no-batch --no-shifted --out $OUT/main \
    --commit "${COMMIT}" 2>&1 | grep '^| v1\|^SSA\|^Selection' | cut -c1-400
el bench
python3 scripts/gpu/ssa_kernel_profile.py --layouts $L --rows 40 2>&1 | grep '^|\|^#' | cut -c1-170 > $OUT/profile.md
head -8 $OUT/profile.md
el profile
timeout 400 python3 benchmarks/bench_ssa.py --layouts $L --out $OUT/full --commit "${COMMIT}" 2>&1 \
    | grep '^| v1' | cut -c1-250
el full

# Issue 4, session 15, call 7: main with the selection's shift "first" as the default. GPU tests (SSA, block
# attention, graphs, layer), bench_ssa.py v1.1 at N = 134k alone (the README's table: seed-0 inputs, the layer rows
# included), the selection's kernels (profile), then the complete benchmark (every size, both configs, the batch,
# the odd layer, the module) for the by-size table. SKIP_TESTS=1: the benchmarks only.
source scripts/gpu/_prelude.sh
if [ -z "${SKIP_TESTS}" ]; then
  python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/ops/ssa tests/ops/block_attn \
      tests/flow/test_cuda_graph.py tests/models/attention > $OUT/tests.txt 2>&1
  tail -2 $OUT/tests.txt
  el tests
fi
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

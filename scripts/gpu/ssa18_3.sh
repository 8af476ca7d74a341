# Issue 4, session 18, call 3: the selection forward's masked chunk first (the block's remainder, which also sets
# the fixed shift, then whole chunks: one special chunk per block instead of a first chunk and a masked tail; ptxas
# sm_90: 1928 against 2380 lines of SASS) against last, A/B interleaved at N = 134k; the top-k at its new cap 80 and
# v1.0's top-k in 32 lists. Then bench_ssa.py v1.1 at N = 134k (the README's table), the complete benchmark (the
# by-size table and the complete run's later draw), the GPU tests (SSA, block attention, graphs, layer; 4 workers).
source scripts/gpu/_prelude.sh
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --kernels slc,topk --variants '{"base": {},
  "last": {"slc": {"masked_chunk": "last"}}}' 2>&1 | grep -v Warn | tee $OUT/v11.txt
el v11
mkdir -p $OUT/main $OUT/full
python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --no-batch --no-shifted --out $OUT/main \
    --commit "${COMMIT}" 2>&1 | grep '^| v1\|^SSA\|^Selection' | cut -c1-400
el bench
timeout 200 python3 benchmarks/bench_ssa.py --layouts $L --out $OUT/full --commit "${COMMIT}" 2>&1 \
    | grep '^| v1' | cut -c1-250
el full
timeout 300 python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 280 tests/ops/ssa tests/ops/block_attn \
    tests/flow/test_cuda_graph.py tests/models/attention > $OUT/tests.txt 2>&1
tail -3 $OUT/tests.txt
el tests

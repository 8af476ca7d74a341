# Issue 4, session 18, call 1: the forwards' row sums as per-lane partials finished once after the key loop
# (rowsum "lanes": no shuffles per key chunk) in the compressed and selection forwards (and the window's online
# softmax), and the top-k's list insertion in two fixed rounds (no CTA-wide count of the rounds: no reduction, no
# barriers). A/B interleaved in one process against the old options (v1.1, N = 134k; and v1.0's compressed
# forward), the exponential's rate in float16, bench_ssa.py v1.1 at N = 134k (the README's table), then the GPU
# tests (SSA, block attention, graphs, layer; 4 workers).
source scripts/gpu/_prelude.sh
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --kernels cmp,topk,slc,win --variants '{"base": {},
  "old": {"cmp": {"rowsum": "reduce"}, "slc": {"rowsum": "reduce"}, "topk": {"fixed_rounds": false}},
  "win_lanes": {"win": {"rowsum": "lanes"}}, "topk80": {"topk": {"maxnreg": 80}}}' \
  2>&1 | grep -v Warn | tee $OUT/v11.txt
el v11
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --m-cmp 4 --kernels cmp --variants '{"base": {},
  "old": {"cmp": {"rowsum": "reduce"}}}' 2>&1 | grep -v Warn | tee $OUT/v10.txt
el v10
python3 scripts/gpu/cvt_rate.py | tee $OUT/cvt_rate.txt
el cvt
mkdir -p $OUT/main
python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --no-batch --no-shifted --out $OUT/main \
    --commit "${COMMIT}" 2>&1 | grep '^| v1\|^SSA\|^Selection' | cut -c1-400
el bench
timeout 330 python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/ops/ssa tests/ops/block_attn \
    tests/flow/test_cuda_graph.py tests/models/attention > $OUT/tests.txt 2>&1
tail -3 $OUT/tests.txt
el tests

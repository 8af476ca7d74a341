# Issue 4, session 10, call 2: the compressed forward at 2 stages capped at 80 registers and 32-row combine programs
# as defaults: the GPU tests (summary in $OUT/tests.txt), bench_ssa v1.1 at N = 134k, then the fwd / topk / slc sweeps
# (128-row tiles for the forward and the top-k).
source scripts/gpu/_prelude.sh
python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/ops/ssa tests/ops/block_attn tests/flow/test_cuda_graph.py \
    tests/models/attention/test_ssa.py > $OUT/tests.txt 2>&1
tail -4 $OUT/tests.txt
el tests
B="python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --configs v1.1 --no-batch --no-shifted --no-module"
mkdir -p $OUT/new $OUT/sweep
$B --out $OUT/new --commit "${COMMIT}" 2>&1 | grep -v "^{\"config" | cut -c1-400
el new
$B --out $OUT/sweep --commit "${COMMIT}" --sweep fwd,topk,slc 2>&1 | grep "^| \(fwd\|topk\|slc\)\|^| v1.1" | cut -c1-330
el sweep
tail -4 $OUT/tests.txt

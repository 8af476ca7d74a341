# Issue 4, session 10, call 1: kv heads and slots as compile-time constants in the block-attention kernels (no
# integer division in a selection tile's prologue), the GPU tests, bench_ssa v1.1 at N = 134k with the previous
# block-attention file (.gpu/old/triton.py, carried) and the new one in the same call, then the fwd / topk / slc sweeps.
source scripts/gpu/_prelude.sh
python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/ops/ssa tests/ops/block_attn tests/flow/test_cuda_graph.py \
    tests/models/attention/test_ssa.py 2>&1 | tail -4
el tests
B="python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --configs v1.1 --no-batch --no-shifted --no-module"
rm -rf /tmp/oldsrc && cp -r src /tmp/oldsrc && cp .gpu/old/triton.py /tmp/oldsrc/d3s2/ops/block_attn/triton.py
mkdir -p $OUT/old $OUT/new $OUT/sweep
PYTHONPATH=/tmp/site:/tmp/oldsrc $B --out $OUT/old --commit "${COMMIT}-old" 2>&1 | grep -v "^{\"config" | cut -c1-400
el old
$B --out $OUT/new --commit "${COMMIT}" 2>&1 | grep -v "^{\"config" | cut -c1-400
el new
$B --out $OUT/sweep --commit "${COMMIT}" --sweep fwd,topk,slc 2>&1 | grep -v "^{\"config" | cut -c1-300
el sweep

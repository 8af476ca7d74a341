# Issue 4, session 9, call 3: the top-k's 32 lists (registers capped at 96) as the v1.1 default: the SSA, compressed
# kernel, block-attention and CUDA-graph GPU tests, then bench_ssa v1.1 at N = 134k (no sweep).
source scripts/gpu/_prelude.sh
python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/ops/ssa tests/ops/block_attn tests/flow/test_cuda_graph.py \
    tests/models/attention/test_ssa.py 2>&1 | tail -4
el tests
python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --configs v1.1 --no-batch --no-shifted --no-module \
    --out $OUT --commit "${COMMIT:-main}" 2>&1 | grep -v "^{\"config" | cut -c1-600
el bench

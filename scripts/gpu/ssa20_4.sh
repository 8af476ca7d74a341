# Issue 4, session 20, call 4: the GPU tests of the SSA, block-attention, CUDA-graph and attention-layer kernels on an
# H100 (every earlier GPU test run was on an H200).
source scripts/gpu/_prelude.sh
python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/ops/ssa tests/ops/block_attn \
    tests/flow/test_cuda_graph.py tests/models/attention > $OUT/tests.txt 2>&1
tail -3 $OUT/tests.txt
el tests

# Issue 4, session 17, call 8: the rest of ssa15_7.sh's GPU tests: the two SSA cases that call 6 cut (still running
# at its limit; its other 74 SSA tests passed, 8 skipped), the CUDA-graph and attention-layer tests.
source scripts/gpu/_prelude.sh
timeout 400 python3 -m pytest -v -p no:cacheprovider -n 4 --timeout 380 --tb=short -rf tests/flow/test_cuda_graph.py \
    tests/models/attention "tests/ops/ssa/test_triton_compress.py::test_topk_lists_match_one_list" \
    "tests/ops/ssa/test_triton_compress.py::test_topk_head_sum_in_registers_matches_reference" > $OUT/tests.txt 2>&1
grep -E "^FAILED|^E  |passed|failed" $OUT/tests.txt | head -40
el tests

#!/bin/bash
# issue 4 (SSA forward targets), one H200, <= 8 min: bench_ssa at N = 133,758 (v1.1) with the top-k's new options
# (int32 keys, logit tile in row chunks, LSE shift in the logit matmul, counted rounds, tiles around them), the
# selection and window tiles swept, then A/B: `new` = the swept winners, `before` = session 4's path (int64 keys,
# whole logit tiles), same run; then the GPU tests of the new top-k options first (compiled), then the rest of the
# SSA GPU tests (compile-bound, capped).
# Needs .gpu/layouts/latent_layouts_1024.npz. COMMIT (optional): the tree's commit to record in the results.
source scripts/gpu/_prelude.sh
timeout 320 python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --configs v1.1 --no-batch --no-shifted \
  --no-module --ab --sweep slc,win,topk --out $OUT ${COMMIT:+--commit $COMMIT} > $OUT/ssa5_bench_log.txt 2>&1
el "bench rc=$?"; grep -v '^{' $OUT/ssa5_bench_log.txt | tail -40
timeout 70 python3 -m pytest -q -p no:cacheprovider tests/ops/ssa/test_triton_compress.py -k "key32 or topk_options" \
  "tests/ops/ssa/test_ssa_gpu.py::test_ssa_triton_topk_options" > $OUT/ssa5_gpu_tests_new.txt 2>&1
el "new-option tests rc=$?"; tail -4 $OUT/ssa5_gpu_tests_new.txt
timeout 70 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops/ssa -k "not topk_options" \
  > $OUT/ssa5_gpu_tests.txt 2>&1
el "gpu tests rc=$?"; tail -4 $OUT/ssa5_gpu_tests.txt

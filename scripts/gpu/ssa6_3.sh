#!/bin/bash
# issue 4, session 6, round 3 (one H200, <= 4 min): the final defaults. GPU tests first: the top-k in float32 with
# few heads per group and wide heads (its default config exceeded the shared memory; it now shrinks to fit), the
# tiny float32 pipeline on CUDA that hit it, graph capture, the whole v1.1 op in fp32 / fp16 / bf16 and v1.0 in bf16
# against the float64 reference, selection and window at full size; then bench_ssa at N = 133,758 (v1.1, no sweep):
# `new` = the defaults, `before` = session 5's path, `new` again.
# Needs .gpu/layouts/latent_layouts_1024.npz. COMMIT (optional): the tree's commit to record in the results.
source scripts/gpu/_prelude.sh
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/ops/ssa/test_ssa_gpu.py::test_ssa_triton_float32_fits_shared_memory \
  tests/pipeline/test_residency.py::test_pipeline_stage_models_on_cuda_and_others_on_the_host \
  > $OUT/ssa6_3_gpu_tests_fp32.txt 2>&1
el "fp32 fit tests rc=$?"; tail -4 $OUT/ssa6_3_gpu_tests_fp32.txt
timeout 75 python3 -m pytest -q -p no:cacheprovider tests/flow/test_cuda_graph.py tests/ops/ssa/test_ssa_gpu.py \
  tests/ops/block_attn/test_triton.py -k "sparse_dit_ssa or (matches_reference and 32-v1.1-fp) or \
(matches_reference and 32-v1.1-bf16) or (matches_reference and 32-v1.0-bf16) or (gpu_error and -32-2-32-)" \
  > $OUT/ssa6_3_gpu_tests.txt 2>&1
el "gpu tests rc=$?"; tail -4 $OUT/ssa6_3_gpu_tests.txt
timeout 90 python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --configs v1.1 --no-batch --no-shifted \
  --no-module --ab --out $OUT ${COMMIT:+--commit $COMMIT} > $OUT/ssa6_3_bench_log.txt 2>&1
el "bench rc=$?"; grep -v '^{' $OUT/ssa6_3_bench_log.txt | tail -14

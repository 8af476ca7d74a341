#!/bin/bash
# issue 4, session 5, round 2 (one H200, <= 4 min): the v1.1 defaults now hold round 1's winners (top-k key32 +
# m_split 4 + counted + lse_dot, no float pre-test; window BLOCK_M 64). bench_ssa A/B at N = 133,758 for v1.1 (the
# new defaults against session 4's path, with the selection forward split into plan and kernel + combine) and v1.0
# (its one-hot segment top-k with the new options swept against session 4's), then the GPU tests of the new code and
# of the default v1.1 path in bf16. Needs .gpu/layouts/latent_layouts_1024.npz. COMMIT (optional): the tree's commit.
source scripts/gpu/_prelude.sh
timeout 170 python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --configs v1.1,v1.0 --no-batch --no-shifted \
  --no-module --ab --sweep topk_seg --out $OUT ${COMMIT:+--commit $COMMIT} > $OUT/ssa5_2_bench_log.txt 2>&1
el "bench rc=$?"; grep -v '^{' $OUT/ssa5_2_bench_log.txt | tail -25
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/ops/ssa/test_triton_compress.py \
  tests/ops/ssa/test_ssa_gpu.py tests/ops/block_attn/test_triton.py \
  -k "key32 or topk_options or window_config or (matches_reference and 32-v1.1-bf16)" > $OUT/ssa5_2_gpu_tests.txt 2>&1
el "gpu tests rc=$?"; tail -4 $OUT/ssa5_2_gpu_tests.txt

#!/bin/bash
# issue 4, session 6, round 2 (one H200, <= 4 min): round 1's winners as the defaults (compressed forward: fixed
# shift, 64-row tiles; selection: fixed shift with per-row adds; window: online softmax; partial combine with its
# slot loop unrolled). GPU tests first (the SSA graph capture, the whole v1.1 op in fp32 / fp16 / bf16 against the
# float64 reference, selection and window at full size, the new options compiled), then bench_ssa at N = 133,758
# (v1.1) with the forwards and the top-k swept around the defaults (tails, chunks, register caps for more CTAs per
# SM), then A/B: `new`, `before` = session 5's path, `new` again (the run-to-run spread).
# Needs .gpu/layouts/latent_layouts_1024.npz. COMMIT (optional): the tree's commit to record in the results.
source scripts/gpu/_prelude.sh
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/flow/test_cuda_graph.py tests/ops/ssa/test_ssa_gpu.py \
  tests/ops/block_attn/test_triton.py tests/ops/ssa/test_triton_compress.py -k "sparse_dit_ssa or \
(matches_reference and 32-v1.1-) or (gpu_error and -32-2-32-) or tile_table or segment_max or unrolled or \
shift_modes or online_softmax" > $OUT/ssa6_2_gpu_tests.txt 2>&1
el "gpu tests rc=$?"; tail -4 $OUT/ssa6_2_gpu_tests.txt
timeout 170 python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --configs v1.1 --no-batch --no-shifted \
  --no-module --ab --sweep slc,win,fwd,topk --out $OUT ${COMMIT:+--commit $COMMIT} > $OUT/ssa6_2_bench_log.txt 2>&1
el "bench rc=$?"; grep -v '^{' $OUT/ssa6_2_bench_log.txt | tail -30

#!/bin/bash
# issue 4, session 7 (one H200, ≈ 4 min): the selection forward's S partials per (query, kv head) merged inside its
# kernel by the program that writes a pair's last one (`merge: "fused"`, the default now) instead of by the
# combine pass after it (session 6). GPU tests first (8 xdist workers): every block_attn test compiled on CUDA
# (the fused merge in fp32 / fp16 / bf16, bf16-bit partials, its determinism across calls, the combine pass), the
# whole v1.1 op in fp32 / fp16 / bf16 and v1.0 in bf16 against the float64 reference, the sparse DiT's CUDA-graph
# replay bit-equal to eager; then bench_ssa at N = 133,758 (v1.1) with the selection swept (fused vs pass,
# registers capped at 128, 64-row tiles, 2 stages; ptxas registers / spills per config), then A/B: `new` = the
# sweep's winner, `before` = session 6's path (the combine pass), `new` again.
# Needs .gpu/layouts/latent_layouts_1024.npz. COMMIT (optional): the tree's commit to record in the results.
source scripts/gpu/_prelude.sh
timeout 180 python3 -m pytest -q -p no:cacheprovider -n 8 -rs --timeout 170 tests/ops/block_attn \
  tests/ops/ssa/test_ssa_gpu.py tests/flow/test_cuda_graph.py -k "block_attn or sparse_dit_ssa or \
(matches_reference and 32-v1.1-fp) or (matches_reference and 32-v1.1-bf16) or \
(matches_reference and 32-v1.0-bf16)" > $OUT/ssa7_gpu_tests.txt 2>&1
el "gpu tests rc=$?"; grep -E "passed|failed" $OUT/ssa7_gpu_tests.txt | tail -2
grep -E "^FAILED|^ERROR|^E  .*(Error|assert)" $OUT/ssa7_gpu_tests.txt | head -12
timeout 210 python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --configs v1.1 --no-batch --no-shifted \
  --no-module --ab --sweep slc --out $OUT ${COMMIT:+--commit $COMMIT} > $OUT/ssa7_bench_log.txt 2>&1
el "bench rc=$?"; grep -E '^\| (v1.1|slc)|^Selection forward' $OUT/ssa7_bench_log.txt

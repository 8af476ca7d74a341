#!/bin/bash
# issue 4, session 6, round 1 (one H200, <= 4 min): the forwards' fixed softmax shift (|q| · largest key norm, no
# running max; row sums on the tensor cores) in the compressed forward, the selection and the window. First the GPU
# tests of the new code (compiled) and of the default v1.1 path in bf16, then bench_ssa at N = 133,758 (v1.1) with
# the forwards swept (shift / FMA-pipe exps / 64-row tiles), the selection's partial combine (slot loop unrolled)
# and the top-k (scale in the matmul, FMA-pipe exps),
# then A/B: `new` = the swept winners, `before` = session 5's path (online softmax everywhere), same run.
# Needs .gpu/layouts/latent_layouts_1024.npz. COMMIT (optional): the tree's commit to record in the results.
source scripts/gpu/_prelude.sh
timeout 70 python3 -m pytest -q -p no:cacheprovider tests/flow/test_cuda_graph.py tests/ops/ssa/test_ssa_gpu.py \
  tests/ops/block_attn/test_triton.py tests/ops/ssa/test_triton_compress.py -k "sparse_dit_ssa or segment_max or \
shift_modes or online_softmax or (key32_split and True-True) or unrolled or (matches_reference and 32-v1.1-bf16) or \
(gpu_error and dtype0-32-2-32)" \
  > $OUT/ssa6_gpu_tests.txt 2>&1
el "gpu tests rc=$?"; tail -4 $OUT/ssa6_gpu_tests.txt
timeout 160 python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --configs v1.1 --no-batch --no-shifted \
  --no-module --ab --sweep slc,win,fwd,topk --out $OUT ${COMMIT:+--commit $COMMIT} > $OUT/ssa6_bench_log.txt 2>&1
el "bench rc=$?"; grep -v '^{' $OUT/ssa6_bench_log.txt | tail -30

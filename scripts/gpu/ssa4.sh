#!/bin/bash
# issue 4 (SSA targets), one H200, <= 4 min: bench_ssa at N = 133,758 (v1.1) with the selection forward, compressed
# forward and top-k swept over exp2 mode (FMA-pipe polynomial, inline-PTX MUFU+polynomial mix), last-chunk-only
# masking and wide chunks with a narrow tail, A/B against session 3's path; then the GPU tests of SSA / block
# attention and the exp2 tests compiled on CUDA. Needs .gpu/layouts/latent_layouts_1024.npz.
source scripts/gpu/_prelude.sh
timeout 150 python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --configs v1.1 --no-batch --no-shifted \
  --no-module --ab --sweep slc,fwd,topk --out $OUT > $OUT/ssa4_bench_log.txt 2>&1
el "bench rc=$?"; grep -v '^{' $OUT/ssa4_bench_log.txt | tail -40
timeout 55 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops/ssa tests/ops/block_attn > $OUT/ssa4_gpu_tests.txt 2>&1
el "gpu tests rc=$?"; tail -4 $OUT/ssa4_gpu_tests.txt
timeout 25 python3 -m pytest -q -p no:cacheprovider tests/ops/test_exp2.py tests/ops/ssa/test_triton_compress.py \
  tests/ops/block_attn/test_triton.py -k "exp2" > $OUT/ssa4_exp2_tests.txt 2>&1
el "exp2 tests rc=$?"; tail -4 $OUT/ssa4_exp2_tests.txt

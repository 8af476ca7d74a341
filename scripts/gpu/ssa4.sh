#!/bin/bash
# issue 4 (SSA targets), one H200, <= 4 min: bench_ssa at N = 133,758 (v1.1), the selection forward, compressed
# forward and top-k swept (exp2 mode mix4, last-chunk-only masking, tiles), A/B against session 3's launch configs;
# then the GPU tests of SSA / block attention (incl. the exp2 modes on the whole op).
# Needs .gpu/layouts/latent_layouts_1024.npz. Run 1 of session 4 swept the exp2 modes mix / poly as well and ran
# the exp2 unit tests on CUDA (`pytest tests/ops/test_exp2.py`).
source scripts/gpu/_prelude.sh
timeout 135 python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --configs v1.1 --no-batch --no-shifted \
  --no-module --ab --sweep slc,fwd,topk --out $OUT > $OUT/ssa4_bench_log.txt 2>&1
el "bench rc=$?"; grep -v '^{' $OUT/ssa4_bench_log.txt | tail -40
timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ops/ssa tests/ops/block_attn > $OUT/ssa4_gpu_tests.txt 2>&1
el "gpu tests rc=$?"; tail -4 $OUT/ssa4_gpu_tests.txt

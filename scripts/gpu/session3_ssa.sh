#!/bin/bash
# Session 3, one H200: GPU tests of the CUDA-graph fallback fix and of SSA/block attention, then bench_ssa A/B
# (session-2 path vs fused compression + scoring + top-k) with the tile sweeps, N = 128k, v1.1.
# Ran on main ccb86eb; the fused kernel (and so `--sweep fused`) was removed afterwards, being slower.
T0=$(date +%s); el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
export PYTHONPATH=$PWD/src:$PYTHONPATH PYTHONUNBUFFERED=1
nvidia-smi -L
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/flow/test_cuda_graph.py tests/models/dit/test_blocks.py > $OUT/graph_tests.txt 2>&1
el "graph tests rc=$?"; tail -3 $OUT/graph_tests.txt
timeout 80 python3 -m pytest -q -p no:cacheprovider -x tests/ops/ssa tests/ops/block_attn/test_triton.py > $OUT/ssa3_tests.txt 2>&1
el "ssa tests rc=$?"; tail -5 $OUT/ssa3_tests.txt
timeout 150 python3 benchmarks/bench_ssa.py --layouts .gpu/layouts/latent_layouts_1024.npz --sizes 131072 --configs v1.1 \
  --no-batch --no-shifted --no-module --ab --sweep fused,slc --out $OUT > $OUT/ssa3_bench_log.txt 2>&1
el "bench rc=$?"; tail -30 $OUT/ssa3_bench_log.txt

#!/bin/bash
# gen3 (issue 6 generation speed), one H200, ~3 min: GPU tests of the CUDA-graph sampler and the half-precision
# norms, dense and sparse DiT step profiles (CUDA-graph replay vs eager, equality), end-to-end bench_generate.
# Needs .gpu/layouts/latent_layouts_1024.npz; wheels in .gpu/whl (trimesh, ...) are installed when present.
source scripts/gpu/_prelude.sh
timeout 150 python3 -m pytest -q -m gpu tests/flow/test_cuda_graph.py tests/models/dit/test_blocks.py \
  tests/pipeline/test_extract.py > $OUT/gpu_tests.log 2>&1
el "gpu tests rc=$?"; tail -4 $OUT/gpu_tests.log
timeout 90 python3 benchmarks/profile_sparse_steps.py --model dense --steps 10 --profile-steps 2 --cuda-graph \
  --out-dir $OUT > /dev/null 2> $OUT/profile.err; el "profile dense rc=$?"; sed -n 5,9p $OUT/profile_dense_cuda.md
timeout 150 python3 benchmarks/profile_sparse_steps.py --layouts $L --resolutions 512 1024 --steps 6 --profile-steps 2 \
  --cuda-graph --out-dir $OUT > /dev/null 2>> $OUT/profile.err; el "profile sparse rc=$?"; sed -n 5,10p $OUT/profile_sparse_cuda.md
timeout 240 python3 benchmarks/bench_generate.py --layouts $L --resolutions 512 1024 --repeats 2 --out-dir $OUT
el "bench rc=$?"; tail -3 $OUT/profile.err

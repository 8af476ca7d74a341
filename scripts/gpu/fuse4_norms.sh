#!/bin/bash
# fuse4 (issue 6: fused DiT norms), one H200, ~3 min: GPU tests of the fused norms / GELU epilogue / blocks / CUDA
# graphs, the per-op micro-benchmark (torch path vs fused), the dense DiT step profile, end-to-end 512³ generate.
# Needs .gpu/layouts/latent_layouts_1024.npz; wheels in .gpu/whl (trimesh, ...) are installed when present.
# $OUT gets 8 files: log.txt, dit_norms.{json,md}, profile_dense_cuda.{json,md}, generate_cuda_fuse4.{json,md},
# gpu_tests.log.
source scripts/gpu/_prelude.sh
# test_blocks.py first: its CUDA generator fails after another test's graph capture in the same process (gen3 log)
timeout 150 python3 -m pytest -q -m gpu tests/models/dit/test_blocks.py tests/ops/dit_norm tests/ops/linear_gelu \
  tests/models/dit/test_blocks_fused.py tests/flow/test_cuda_graph.py > $OUT/gpu_tests.log 2>&1
el "gpu tests rc=$?"; tail -4 $OUT/gpu_tests.log
timeout 90 python3 benchmarks/bench_dit_norms.py --out-dir $OUT > /dev/null 2> $OUT/log.txt
el "bench_dit_norms rc=$?"; sed -n 5,40p $OUT/dit_norms.md
timeout 90 python3 benchmarks/profile_sparse_steps.py --model dense --steps 10 --profile-steps 2 --cuda-graph \
  --out-dir $OUT > /dev/null 2>> $OUT/log.txt; el "profile dense rc=$?"; sed -n 5,9p $OUT/profile_dense_cuda.md
timeout 150 python3 benchmarks/bench_generate.py --layouts $L --resolutions 512 --repeats 2 --out-dir $OUT --label fuse4 \
  2>> $OUT/log.txt; el "bench rc=$?"; tail -5 $OUT/log.txt

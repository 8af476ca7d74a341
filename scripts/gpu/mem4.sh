#!/bin/bash
# issue 6 memory targets (weight residency, chunked marching cubes), one H200, ~2.5 min: GPU tests of the residency,
# marching cubes and extraction; end-to-end bench_generate at 512³ and 1024³ (peak per stage in the table).
# Needs .gpu/layouts/latent_layouts_1024.npz; wheels in .gpu/whl (trimesh, ...) are installed when present.
source scripts/gpu/_prelude.sh
timeout 120 python3 -m pytest -q -m gpu tests/pipeline/test_residency.py tests/geometry/test_marching_cubes.py \
  tests/pipeline/test_extract.py > $OUT/gpu_tests_mem.log 2>&1
el "gpu tests rc=$?"; tail -4 $OUT/gpu_tests_mem.log
timeout 240 python3 benchmarks/bench_generate.py --layouts $L --resolutions 512 1024 --repeats 2 --out-dir $OUT
rc=$?; el "bench rc=$rc"
if [ $rc -ne 0 ]; then  # the residency failed on the GPU: measure the rest with every model resident
  timeout 150 python3 benchmarks/bench_generate.py --layouts $L --resolutions 512 1024 --repeats 2 --skip-index \
    --residency resident --label resident --out-dir $OUT; el "bench resident rc=$?"
fi

#!/bin/bash
# issue 6 memory targets (weight residency, chunked marching cubes), one H200, ~2.5 min: GPU tests of the residency,
# marching cubes and extraction; end-to-end bench_generate at 512³ and 1024³ (peak per stage in the table).
# Needs .gpu/layouts/latent_layouts_1024.npz; wheels in .gpu/whl (trimesh, ...) are installed when present.
T0=$(date +%s); el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
if ls .gpu/whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PYTHONPATH PYTHONUNBUFFERED=1
L=.gpu/layouts/latent_layouts_1024.npz
nvidia-smi -L; el start
timeout 120 python3 -m pytest -q -m gpu tests/pipeline/test_residency.py tests/geometry/test_marching_cubes.py \
  tests/pipeline/test_extract.py > $OUT/gpu_tests_mem.log 2>&1
el "gpu tests rc=$?"; tail -4 $OUT/gpu_tests_mem.log
timeout 240 python3 benchmarks/bench_generate.py --layouts $L --resolutions 512 1024 --repeats 2 --out-dir $OUT
rc=$?; el "bench rc=$rc"
if [ $rc -ne 0 ]; then  # the residency failed on the GPU: measure the rest with every model resident
  timeout 150 python3 benchmarks/bench_generate.py --layouts $L --resolutions 512 1024 --repeats 2 --skip-index \
    --residency resident --label resident --out-dir $OUT; el "bench resident rc=$?"
fi

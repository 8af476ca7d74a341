#!/bin/bash
# Session 4, one H200: (1) 1024³ GPU SDF, Triton near-list op vs torch pairs, plus the geometry / mesh_field GPU
# tests (bench_sdf_gpu.py); (2) the GPU tests of the SS-VAE and trainer (packed batches expanded on the GPU
# without host syncs). Carried: .gpu/whl, .gpu/sub (1200-asset subset), .gpu/named_0ad.npz.
source scripts/gpu/_prelude.sh
timeout 330 python3 benchmarks/bench_sdf_gpu.py --npz .gpu/sub/0ad_meshes.npz --named-npz .gpu/named_0ad.npz \
  > $OUT/sdf_gpu_log.txt 2>&1
el "sdf bench rc=$?"; tail -45 $OUT/sdf_gpu_log.txt
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/models/vae tests/train > $OUT/vae_gpu_tests.txt 2>&1
el "vae gpu tests rc=$?"; tail -5 $OUT/vae_gpu_tests.txt

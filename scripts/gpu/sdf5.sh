#!/bin/bash
# Session 5, one H200 (~5 min): 1024³ GPU SDF after the block-closure rework (branch sdf5). (1) The session-4
# sample (seed 0, 30 assets) and named meshes, new (Triton) vs old (torch pairs) path, with the geometry /
# mesh_field GPU tests and a torch.profiler table of three slow assets; (2) 60 more assets (seed 1), new path
# staged, old path while its budget lasts.
# Carried: .gpu/whl, .gpu/sub (1200-asset subset), .gpu/named_0ad.npz.
source scripts/gpu/_prelude.sh
timeout 220 python3 benchmarks/bench_sdf_gpu.py --npz .gpu/sub/0ad_meshes.npz --named-npz .gpu/named_0ad.npz \
  --profile structural/han_ministry structural/pers_range gaia/tree_oak_large_top_c --out-dir $OUT \
  > $OUT/sdf_gpu_log.txt 2>&1
el "sdf bench (seed 0) rc=$?"; tail -45 $OUT/sdf_gpu_log.txt
mkdir -p $OUT/seed1
timeout 120 python3 benchmarks/bench_sdf_gpu.py --npz .gpu/sub/0ad_meshes.npz --named --sample 60 --seed 1 \
  --no-tests --old-stages none --time-budget 75 --out-dir $OUT/seed1 > $OUT/seed1/sdf_gpu_log.txt 2>&1
el "sdf bench (seed 1) rc=$?"; tail -30 $OUT/seed1/sdf_gpu_log.txt

#!/bin/bash
# Session 6, one H200 (~2.5 min, at most 4): 1024³ GPU SDF after the host-sync rework (branch sdf6).
# (1) The geometry / mesh_field GPU tests (full output kept); (2) the 14 slowest assets of session 5 (han_ministry
# and sele_civ_center_metropolitan, the two still over 1 s, first), per stage, with an A/B of the host copy
# (background thread vs synchronous .cpu()), near-field kernel configs and a torch.profiler table of the two;
# (3) the session-4/5 seed-0 sample (30 assets + 3 named), new path only, for the full comparison with session 5.
# Carried: .gpu/whl, .gpu/sub (1200-asset subset), .gpu/named_0ad.npz. Writes 8 files under $OUT.
source scripts/gpu/_prelude.sh
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ops/mesh_field tests/geometry > $OUT/gpu_tests.txt 2>&1
el "gpu tests rc=$?"; tail -3 $OUT/gpu_tests.txt
mkdir -p $OUT/slow $OUT/seed0
timeout 110 python3 benchmarks/bench_sdf_gpu.py --npz .gpu/sub/0ad_meshes.npz --named-npz .gpu/named_0ad.npz \
  --no-tests --no-old --host-copy-ab --named structural/han_ministry structural/sele_civ_center_metropolitan \
  structural/pers_range props/pers_alt_build_01 gaia/tree_oak_large_top_c props/helmet/han_cavalry_helmet \
  gaia/geo_waterfall_double structural/ptol_temple_helle_2 structural/spart_blacksmith structural/hele_stable \
  props/maur_workshop_roof structural/rome_range gaia/oak_tree_a_small structural/mausoleum_struct --sample 0 \
  --profile structural/han_ministry structural/sele_civ_center_metropolitan --kernel-ab 128x4 64x2 256x8 --time-budget 60 \
  --out-dir $OUT/slow > $OUT/slow/sdf_gpu_log.txt 2>&1
el "sdf bench (slow assets) rc=$?"; tail -22 $OUT/slow/sdf_gpu_log.txt
timeout 60 python3 benchmarks/bench_sdf_gpu.py --npz .gpu/sub/0ad_meshes.npz --named-npz .gpu/named_0ad.npz \
  --no-tests --no-old --sample 30 --seed 0 --time-budget 40 --out-dir $OUT/seed0 > $OUT/seed0/sdf_gpu_log.txt 2>&1
el "sdf bench (seed 0) rc=$?"; tail -8 $OUT/seed0/sdf_gpu_log.txt

#!/bin/bash
# Session 5 round 2, one H200 (~1.5 min): the geometry / mesh_field GPU tests (full output kept), then the 1024³
# GPU SDF, new path only, on the 14 slowest assets of round 1 (scripts/gpu/sdf5.sh: seed-0 and seed-1 samples and
# named meshes), per-stage, with an A/B of the host copy (pinned side stream vs plain .cpu()), plus a torch.profiler
# table of two of them.
# Carried: .gpu/whl, .gpu/sub (1200-asset subset), .gpu/named_0ad.npz.
source scripts/gpu/_prelude.sh
timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ops/mesh_field tests/geometry > $OUT/gpu_tests.txt 2>&1
el "gpu tests rc=$?"; tail -3 $OUT/gpu_tests.txt
timeout 150 python3 benchmarks/bench_sdf_gpu.py --npz .gpu/sub/0ad_meshes.npz --named-npz .gpu/named_0ad.npz \
  --no-tests --no-old --host-copy-ab --named structural/han_ministry structural/pers_range props/pers_alt_build_01 \
  gaia/tree_oak_large_top_c props/helmet/han_cavalry_helmet gaia/geo_waterfall_double \
  structural/sele_civ_center_metropolitan structural/ptol_temple_helle_2 structural/spart_blacksmith \
  structural/hele_stable props/maur_workshop_roof structural/rome_range gaia/oak_tree_a_small \
  structural/mausoleum_struct --sample 0 --profile structural/han_ministry structural/sele_civ_center_metropolitan \
  --out-dir $OUT > $OUT/sdf_gpu_log.txt 2>&1
el "sdf bench (slow assets) rc=$?"; tail -20 $OUT/sdf_gpu_log.txt

#!/bin/bash
# Session 6, one H200 (issue 5): what limits the demo SS-VAE's held-out F@0.005 (0.725 for v3)? Build the 65 test
# shapes of the 1200-asset subset at 256³ on the GPU (no renders), score v3 as `d3s2 eval vae` does, then
# benchmarks/diagnose_vae_latent.py: the same decoder from the encoder's latent vs from a latent optimised directly
# against each shape's targets (16 shapes, 300 Adam steps). Carried: .gpu/whl, .gpu/test65_0ad.npz, .gpu/v3. ≈ 3 min.
source scripts/gpu/_prelude.sh
IGL_NUM_THREADS=1 OMP_NUM_THREADS=1 timeout -s TERM 60 python3 -m d3s2.cli data build 0ad --corpus .gpu/test65_0ad.npz \
  --resolutions 256 --views 0 --out /tmp/t65 --workers 8 --device cuda --no-progress > $OUT/vae_build.log 2>&1
el "build rc=$?"; tail -2 $OUT/vae_build.log
timeout 120 python3 -m d3s2.cli eval vae --data /tmp/t65 --weights .gpu/v3 --split test --samples 50000 --device cuda \
  --json $OUT/vae_v3_eval_test65.json > $OUT/vae_eval.log 2>&1
el "eval rc=$?"; tail -2 $OUT/vae_eval.log
timeout ${ORACLE_S:-240} python3 benchmarks/diagnose_vae_latent.py --data /tmp/t65 --weights .gpu/v3 --split test \
  --limit ${ORACLE_SHAPES:-16} --iters 300 --device cuda --out $OUT/vae_latent_oracle_v3.json > $OUT/vae_oracle.log 2>&1
el "oracle rc=$?"; tail -3 $OUT/vae_oracle.log

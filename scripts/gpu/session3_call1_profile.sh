#!/bin/bash
# Session 3, GPU call 1 (one H200): GPU-SDF corpus build speed, then where a demo SS-VAE training step's time goes.
T0=$(date +%s); el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 D3S2_0AD_NPZ=$PWD/.gpu/data/0ad_meshes.npz
nvidia-smi -L; nproc; el installed
IGL_NUM_THREADS=1 OMP_NUM_THREADS=1 timeout -s TERM ${BUILD_S:-150} python3 -m d3s2.cli data build 0ad --subset ${SUBSET:-400} \
  --resolutions 256 --views 4 --out /tmp/d256 --workers ${WORKERS:-8} --device cuda --no-progress > $OUT/build.log 2>&1
el "build rc=$?"; ls /tmp/d256/assets/0ad/*/ | wc -l
python3 benchmarks/summarize_build.py /tmp/d256 --total 4010 > $OUT/build_summary.md 2>&1; head -30 $OUT/build_summary.md
export OMP_NUM_THREADS=4
python3 benchmarks/profile_train_step.py --config configs/demo/ss_vae_train.yaml --task.args.data=/tmp/d256 \
  --data.micro_batches_per_step=1 --warmup 5 --steps 30 --profile-steps 3 --out-dir /tmp/p1 > $OUT/profile_micro1.log 2>&1
el "profile 1 rc=$?"; cp /tmp/p1/profile_train_step.md $OUT/profile_micro1.md; cp /tmp/p1/profile_train_step.json $OUT/profile_micro1.json
head -45 $OUT/profile_micro1.md
el done

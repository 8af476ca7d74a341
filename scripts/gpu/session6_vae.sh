#!/bin/bash
# Session 6, SS-VAE v4 on one warm H200 (calls < 30 s apart share /tmp). v3's held-out error is mostly structural:
# its latents sit only on blocks holding band voxels, so the blocks that close the band (hole membranes) are never
# decoded and open meshes come back as double-walled shells (CPU check on test shapes: v3 vs the band-blocks-only
# reference F@0.005 0.998 for head_female_shorthair, vs the full reference 0.616). v4 = v3 + training with
# latent_structure "blocks" (a latent on every occupied block of the data).
#   PHASE=A  build the 1200-asset subset at 256³ (GPU SDF, no renders), fine-tune v3 for the rest of the call;
#   PHASE=B  resume for B_TRAIN_MIN minutes, export, fp16 copy to $OUT, evaluate v4 on the test split (65 shapes).
# Carried: .gpu/whl, .gpu/sub (corpus subset), .gpu/v3 (v3 fp16 export).
T0=$(date +%s); el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
CALL_S=${CALL_S:-570}
left_min() { python3 -c "import time; print(max(($T0 + $CALL_S - $1 - time.time()) / 60, 0.5))"; }
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
VAE="python3 -m d3s2.cli train vae --config configs/demo/ss_vae_train.yaml --task.args.data=/tmp/d256 --out /tmp/vae_run
  --train.max_steps=${MAX_STEPS:-2400} --train.ckpt_every=200 --train.progress=false --data.num_workers=14
  --data.max_tokens=3000000 --data.micro_batches_per_step=1 --optim.lr=2e-4 --optim.warmup_steps=50"
pack() {
  python3 - <<'PY'
from safetensors.torch import load_file, save_file
s = load_file("/tmp/vae_run/export/model.safetensors")
save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in s.items()}, "/tmp/model.safetensors")
PY
  tar cf $OUT/vae_v4_fp16.tar -C /tmp/vae_run/export config.json vae_task.json -C /tmp model.safetensors
  cp /tmp/vae_run/train_log.jsonl $OUT/vae_v4_train_log.jsonl
}
case $PHASE in
A)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
  nvidia-smi -L; el installed
  IGL_NUM_THREADS=1 OMP_NUM_THREADS=1 timeout -s TERM 200 python3 -m d3s2.cli data build 0ad --corpus .gpu/sub/0ad_meshes.npz \
    --resolutions 256 --views 0 --out /tmp/d256 --workers 14 --device cuda --no-progress > $OUT/build.log 2>&1
  el "build rc=$?"; tail -1 $OUT/build.log
  $VAE --train.init_from=.gpu/v3/model.safetensors --train.max_minutes=$(left_min 15) > $OUT/vae_A.log 2>&1
  el "vae rc=$?"; tail -3 $OUT/vae_A.log; tail -1 /tmp/vae_run/train_log.jsonl | cut -c1-400;;
B)
  $VAE --resume --train.max_minutes=${B_TRAIN_MIN:-4} > $OUT/vae_B.log 2>&1
  el "vae rc=$?"; tail -1 /tmp/vae_run/train_log.jsonl | cut -c1-400; pack; el packed
  python3 -m d3s2.cli eval vae --data /tmp/d256 --weights /tmp/vae_run/export --split test --samples 50000 --device cuda \
    --json $OUT/vae_v4_eval_test.json > $OUT/vae_v4_eval.log 2>&1
  el "eval rc=$?"; tail -2 $OUT/vae_v4_eval.log;;
esac
ls -la $OUT; el "phase $PHASE done"

#!/bin/bash
# Session 4, SS-VAE chain on one warm H200 (calls < 30 s apart share /tmp):
#   PHASE=A  build the 1200-asset 0 A.D. subset at 256³ (GPU SDF, 4 views), continue the session-3 SS-VAE
#            (.gpu/sub/vae_v1, held-out F@0.005 0.626) with 3 M-voxel micro-batches (the step is launch-bound
#            at 0.6 M) for the rest of the call;
#   PHASE=B  resume for the call; export, fp16 copy to $OUT (safety net);
#   PHASE=C  resume for part of the call, export, evaluate the new and the session-3 SS-VAE on the test split,
#            pack the fp16 weights and logs to $OUT.
# Carried: .gpu/whl, .gpu/sub (corpus subset + vae_v1).
T0=$(date +%s); el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
CALL_S=${CALL_S:-560}
left_min() { python3 -c "import time; print(max(($T0 + $CALL_S - $1 - time.time()) / 60, 0.5))"; }
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
VAE="python3 -m d3s2.cli train vae --config configs/demo/ss_vae_train.yaml --task.args.data=/tmp/d256 --out /tmp/vae_run
  --train.max_steps=${MAX_STEPS:-3000} --train.ckpt_every=200 --train.progress=false --data.num_workers=14
  --data.max_tokens=3000000 --data.micro_batches_per_step=1 --optim.warmup_steps=50"
pack() {
  python3 - <<'PY'
from safetensors.torch import load_file, save_file
s = load_file("/tmp/vae_run/export/model.safetensors")
save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in s.items()}, "/tmp/model.safetensors")
PY
  tar cf - -C /tmp/vae_run/export config.json vae_task.json -C /tmp model.safetensors | split -b 15M - $OUT/vae_v2_fp16.tar.part-
  cp /tmp/vae_run/train_log.jsonl $OUT/vae_v2_train_log.jsonl
}
case $PHASE in
A)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
  nvidia-smi -L; el installed
  IGL_NUM_THREADS=1 OMP_NUM_THREADS=1 timeout -s TERM 230 python3 -m d3s2.cli data build 0ad --corpus .gpu/sub/0ad_meshes.npz \
    --resolutions 256 --views 4 --out /tmp/d256 --workers 14 --device cuda --no-progress > $OUT/build.log 2>&1
  el "build rc=$?"; python3 benchmarks/summarize_build.py /tmp/d256 --total 1200 > $OUT/build_summary.md 2>&1; head -12 $OUT/build_summary.md
  $VAE --train.init_from=.gpu/sub/vae_v1 --train.max_minutes=$(left_min 30) > $OUT/vae_A.log 2>&1
  el "vae rc=$?"; tail -3 $OUT/vae_A.log; tail -2 /tmp/vae_run/train_log.jsonl;;
B)
  $VAE --resume --train.max_minutes=$(left_min 50) > $OUT/vae_B.log 2>&1
  el "vae rc=$?"; tail -3 $OUT/vae_B.log; tail -2 /tmp/vae_run/train_log.jsonl; pack; el packed;;
C)
  $VAE --resume --train.max_minutes=${C_TRAIN_MIN:-2.5} > $OUT/vae_C.log 2>&1
  el "vae rc=$?"; tail -2 /tmp/vae_run/train_log.jsonl; pack; el packed
  for w in v2:/tmp/vae_run/export v1:.gpu/sub/vae_v1; do
    python3 -m d3s2.cli eval vae --data /tmp/d256 --weights ${w#*:} --split test --samples 50000 --device cuda \
      --json $OUT/vae_${w%%:*}_eval_test.json > $OUT/vae_${w%%:*}_eval.log 2>&1 &
  done; wait; el "eval done"; tail -4 $OUT/vae_v2_eval.log $OUT/vae_v1_eval.log;;
esac
ls -la $OUT; el "phase $PHASE done"

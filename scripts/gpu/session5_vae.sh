#!/bin/bash
# Session 5, SS-VAE v3 chain on one warm H200 (calls < 30 s apart share /tmp):
#   PHASE=A  GPU tests (VAE, trainer, SSA, block attention, exp2) beside the 256³ build of the 1200-asset subset
#            (GPU SDF, 4 views); then continue SS-VAE v2 (.gpu/s5/vae_v2, held-out F@0.005 0.717) with a fresh
#            cosine schedule (peak 3e-4) and 3 M-voxel micro-batches for the rest of the call;
#   PHASE=B  resume for the call; fp16 copy to $OUT (safety net);
#   PHASE=C  resume for part of the call, export, evaluate v3 and v2 on the test split and v3 on 24 train shapes.
# Carried: .gpu/whl, .gpu/sub (corpus subset), .gpu/s5 (v2 weights).
T0=$(date +%s); el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
CALL_S=${CALL_S:-570}
left_min() { python3 -c "import time; print(max(($T0 + $CALL_S - $1 - time.time()) / 60, 0.5))"; }
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
VAE="python3 -m d3s2.cli train vae --config configs/demo/ss_vae_train.yaml --task.args.data=/tmp/d256 --out /tmp/vae_run
  --train.max_steps=${MAX_STEPS:-4500} --train.ckpt_every=200 --train.progress=false --data.num_workers=14
  --data.max_tokens=3000000 --data.micro_batches_per_step=1 --optim.lr=3e-4 --optim.warmup_steps=100"
pack() {
  python3 - <<'PY'
from safetensors.torch import load_file, save_file
s = load_file("/tmp/vae_run/export/model.safetensors")
save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in s.items()}, "/tmp/model.safetensors")
PY
  tar cf - -C /tmp/vae_run/export config.json vae_task.json -C /tmp model.safetensors | split -b 15M - $OUT/vae_v3_fp16.tar.part-
  cp /tmp/vae_run/train_log.jsonl $OUT/vae_v3_train_log.jsonl
}
case $PHASE in
A)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
  nvidia-smi -L; el installed
  (timeout 420 python3 -m pytest -q -p no:cacheprovider -m gpu tests/models/vae tests/train tests/ops/ssa \
     tests/ops/block_attn tests/ops/test_exp2.py > $OUT/gpu_tests.txt 2>&1; echo "rc=$?" >> $OUT/gpu_tests.txt) &
  IGL_NUM_THREADS=1 OMP_NUM_THREADS=1 timeout -s TERM 280 python3 -m d3s2.cli data build 0ad --corpus .gpu/sub/0ad_meshes.npz \
    --resolutions 256 --views 4 --out /tmp/d256 --workers 12 --device cuda --no-progress > $OUT/build.log 2>&1
  el "build rc=$?"; python3 benchmarks/summarize_build.py /tmp/d256 --total 1200 > $OUT/build_summary.md 2>&1; head -4 $OUT/build_summary.md
  $VAE --train.init_from=.gpu/s5/vae_v2/model.safetensors --train.max_minutes=$(left_min 20) > $OUT/vae_A.log 2>&1
  el "vae rc=$?"; tail -3 $OUT/vae_A.log; tail -1 /tmp/vae_run/train_log.jsonl | cut -c1-300
  wait; tail -3 $OUT/gpu_tests.txt;;
B)
  $VAE --resume --train.max_minutes=$(left_min 45) > $OUT/vae_B.log 2>&1
  el "vae rc=$?"; tail -3 $OUT/vae_B.log; tail -1 /tmp/vae_run/train_log.jsonl | cut -c1-300; pack; el packed;;
C)
  $VAE --resume --train.max_minutes=${C_TRAIN_MIN:-4} > $OUT/vae_C.log 2>&1
  el "vae rc=$?"; tail -1 /tmp/vae_run/train_log.jsonl | cut -c1-300; pack; el packed
  python3 - <<'PY'
import json, os, random
from pathlib import Path
from d3s2.data.dataset import split_of
root, out = Path("/tmp/d256"), Path("/tmp/evtrain")
rows = [l for l in open(root / "manifest.jsonl") if json.loads(l)["status"] == "ok" and split_of(json.loads(l)["name"]) == "train"]
random.Random(0).shuffle(rows)
(out / "assets").mkdir(parents=True, exist_ok=True)
(out / "build.json").write_text((root / "build.json").read_text())
(out / "manifest.jsonl").write_text("".join(rows[:24]))
for l in rows[:24]:
    n = json.loads(l)["name"]; dst = out / "assets" / (n + ".npz"); dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(root / "assets" / (n + ".npz"), dst)
PY
  for w in v3:/tmp/vae_run/export v2:.gpu/s5/vae_v2; do
    python3 -m d3s2.cli eval vae --data /tmp/d256 --weights ${w#*:} --split test --samples 50000 --device cuda \
      --json $OUT/vae_${w%%:*}_eval_test.json > $OUT/vae_${w%%:*}_eval.log 2>&1 &
  done
  python3 -m d3s2.cli eval vae --data /tmp/evtrain --weights /tmp/vae_run/export --split train --samples 50000 \
    --device cuda --json $OUT/vae_v3_eval_train24.json > $OUT/vae_v3_eval_train24.log 2>&1 &
  wait; el "eval done"; tail -4 $OUT/vae_v3_eval.log $OUT/vae_v2_eval.log $OUT/vae_v3_eval_train24.log;;
esac
ls -la $OUT; el "phase $PHASE done"

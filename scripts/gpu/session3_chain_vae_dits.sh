#!/bin/bash
# Session 3, GPU chain on one warm H200 (three calls < 30 s apart share /tmp):
#   PHASE=A  build the 1200-asset 0 A.D. subset at 256³ (GPU SDF, 4 views), continue the demo SS-VAE from the
#            shipped weights (train.init_from) for the rest of the call;
#   PHASE=B  resume the same run for the call; export, fp16 copy to $OUT (safety net);
#   PHASE=C  evaluate the SS-VAE on the test split, encode latents, continue the dense DiT (same dense VAE) and the
#            sparse DiT (new latents) from the shipped weights side by side, assemble the pipeline, pack it to $OUT.
# Carried: A .gpu/whl + .gpu/sub (1200-asset corpus subset, shipped SS-VAE); C .gpu/c3s (shipped DiTs, dense VAE).
T0=$(date +%s); el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
CALL_S=${CALL_S:-540}
left_min() { python3 -c "import time; print(max(($T0 + $CALL_S - $1 - time.time()) / 60, 0.5))"; }
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
VAE="python3 -m d3s2.cli train vae --config configs/demo/ss_vae_train.yaml --task.args.data=/tmp/d256 --out /tmp/vae_run
  --train.max_steps=4000 --train.ckpt_every=250 --train.progress=false --data.num_workers=10 --optim.warmup_steps=50"
case $PHASE in
A)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
  nvidia-smi -L; el installed
  IGL_NUM_THREADS=1 OMP_NUM_THREADS=1 timeout -s TERM 240 python3 -m d3s2.cli data build 0ad --corpus .gpu/sub/0ad_meshes.npz \
    --resolutions 256 --views 4 --out /tmp/d256 --workers 12 --device cuda --no-progress > $OUT/build.log 2>&1
  el "build rc=$?"; python3 benchmarks/summarize_build.py /tmp/d256 --total 1200 > $OUT/build_summary.md 2>&1; head -20 $OUT/build_summary.md
  $VAE --train.init_from=.gpu/sub/vae_init --train.max_minutes=$(left_min 30) > $OUT/vae_A.log 2>&1
  el "vae rc=$?"; cp /tmp/vae_run/train_log.jsonl $OUT/vae_train_log_A.jsonl; tail -2 /tmp/vae_run/train_log.jsonl;;
B)
  $VAE --resume --train.max_minutes=$(left_min 60) > $OUT/vae_B.log 2>&1
  el "vae rc=$?"; cp /tmp/vae_run/train_log.jsonl $OUT/vae_train_log.jsonl; tail -2 /tmp/vae_run/train_log.jsonl
  python3 - <<'PY'
from safetensors.torch import load_file, save_file
s = load_file("/tmp/vae_run/export/model.safetensors")
save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in s.items()}, "/tmp/vae_fp16.safetensors")
PY
  tar cf - -C /tmp/vae_run/export config.json vae_task.json -C /tmp vae_fp16.safetensors | split -b 15M - $OUT/vae_fp16.tar.part-
  el packed;;
C)
  (python3 -m d3s2.cli eval vae --data /tmp/d256 --weights /tmp/vae_run/export --split test --samples 50000 --device cuda \
     --json $OUT/vae_eval_test.json > $OUT/vae_eval.log 2>&1; echo "eval rc=$?" >> $OUT/vae_eval.log) &
  python3 -m d3s2.cli data encode --data /tmp/d256 --vae /tmp/vae_run/export --out /tmp/enc --device cuda --no-progress > $OUT/encode.log 2>&1
  el "encode rc=$?"
  python3 - <<'PY'
from safetensors.torch import load_file, save_file
for name, dit, enc in (("dense", "dense_dit", "conditioner_dense_dit"), ("sparse", "sparse_dit_256", "conditioner_sparse_dit_256")):
    state = {f"dit.{k}": v for k, v in load_file(f".gpu/c3s/{dit}/model.safetensors").items()}
    state.update({f"encoder.{k}": v for k, v in load_file(f".gpu/c3s/{enc}/model.safetensors").items()})
    save_file(state, f"/tmp/init_{name}.safetensors")
PY
  M=$(left_min 75)
  python3 -m d3s2.cli train dit_sparse --config configs/demo/dit_sparse_train.yaml --out /tmp/dit_sparse --train.progress=false \
    --task.args.latents=/tmp/enc --task.args.data=/tmp/d256 --data.num_workers=7 --train.init_from=/tmp/init_sparse.safetensors \
    --optim.warmup_steps=20 --train.max_minutes=$M > $OUT/dit_sparse.log 2>&1 &
  python3 -m d3s2.cli train dit_dense --config configs/demo/dit_dense_train.yaml --out /tmp/dit_dense --train.progress=false \
    --task.args.latents=/tmp/enc --task.args.data=/tmp/d256 --task.args.dense_vae=.gpu/c3s/dense_vae --data.num_workers=7 \
    --train.init_from=/tmp/init_dense.safetensors --optim.warmup_steps=20 --train.max_minutes=$M > $OUT/dit_dense.log 2>&1
  el "dense rc=$?"; wait; el "sparse + eval done"
  python3 scripts/assemble_pipeline.py --sparse-vae /tmp/vae_run/export --dense-vae .gpu/c3s/dense_vae \
    --dense-dit /tmp/dit_dense/export --sparse-dit /tmp/dit_sparse/export --out /tmp/pipeline \
    --dense-steps 20 --sparse-steps 20 --cfg 3.0 --summary $OUT/pipeline_summary.json > $OUT/assemble.log 2>&1
  el "assemble rc=$?"; tar cf - -C /tmp pipeline | split -b 15M - $OUT/pipeline.tar.part-
  tail -3 $OUT/vae_eval.log; tail -2 /tmp/dit_sparse/train_log.jsonl /tmp/dit_dense/train_log.jsonl
  cp /tmp/dit_sparse/train_log.jsonl $OUT/dit_sparse_log.jsonl; cp /tmp/dit_dense/train_log.jsonl $OUT/dit_dense_log.jsonl
  (cd $OUT && tar czf logs_C.tgz *.log *.json *.jsonl && rm -f *.log *.json *.jsonl);;
esac
ls -la $OUT; el "phase $PHASE done"

#!/bin/bash
# Session 7, SS-VAE v5 and a pipeline retrained on its latents, on one warm H200 (calls < 30 s apart share /tmp).
# v5 = v4 (session 6: v3 + 2,400 steps with latent_structure "blocks") + more steps of the same recipe: v4's loss was
# still falling and the model under-fits (train and held-out shapes score alike).
#   PHASE=A  build the 1200-asset subset at 256³ (GPU SDF, 4 renders per asset for the DiTs), fine-tune v4 for the
#            rest of the call;
#   PHASE=B  resume for B_TRAIN_MIN minutes, export, fp16 copy to $OUT, evaluate v5 on the test split (65 shapes);
#   PHASE=C  encode the build with v5, fine-tune the dense VAE on the new occupancy, then the dense DiT on it, the
#            sparse DiT beside them, assemble the fp16 pipeline into $OUT (split in 15 MB parts).
#   PHASE=D  (a fresh machine) rebuild the subset, encode it with v5 (.gpu/s7v5), and score v5's decoder from the
#            encoder's latent and from a latent optimised directly (diagnose_vae_latent.py, 10 test shapes);
#   PHASE=E  continue the sparse DiT (.gpu/s7sdit: C's, as "dit.*" + "encoder.*") alone on the GPU and all 16 cores
#            for the rest of the call: in C it shared both with the dense runs (1.3 steps/s); export to $OUT.
# Carried: A .gpu/whl .gpu/sub .gpu/session6/vae_v4; C .gpu/s7init (the shipped dense VAE, DiTs and image encoders);
#          D .gpu/whl .gpu/sub .gpu/s7v5; E .gpu/s7sdit.
T0=$(date +%s); el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
CALL_S=${CALL_S:-570}
left_min() { python3 -c "import time; print(max(($T0 + $CALL_S - $1 - time.time()) / 60, 0.5))"; }
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
VAE="python3 -m d3s2.cli train vae --config configs/demo/ss_vae_train.yaml --task.args.data=/tmp/d256 --out /tmp/vae_run
  --train.max_steps=${MAX_STEPS:-4800} --train.ckpt_every=200 --train.progress=false --data.num_workers=14
  --data.max_tokens=3000000 --data.micro_batches_per_step=1 --optim.lr=${LR:-2e-4} --optim.warmup_steps=50
  ${KL:+--task.args.model_args.loss.in_band=1.0 --task.args.model_args.loss.ext=0.1 --task.args.model_args.loss.sharp=1.0 --task.args.model_args.loss.kl=$KL}"
pack() {
  python3 - <<'PY'
from safetensors.torch import load_file, save_file
s = load_file("/tmp/vae_run/export/model.safetensors")
save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in s.items()}, "/tmp/model.safetensors")
PY
  tar cf $OUT/vae_v5_fp16.tar -C /tmp/vae_run/export config.json vae_task.json -C /tmp model.safetensors
  cp /tmp/vae_run/train_log.jsonl $OUT/vae_v5_train_log.jsonl
}
case $PHASE in
A)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
  nvidia-smi -L; el installed
  IGL_NUM_THREADS=1 OMP_NUM_THREADS=1 timeout -s TERM 300 python3 -m d3s2.cli data build 0ad --corpus .gpu/sub/0ad_meshes.npz \
    --resolutions 256 --views 4 --out /tmp/d256 --workers 15 --device cuda --no-progress > $OUT/build.log 2>&1
  el "build rc=$?"; tail -1 $OUT/build.log
  $VAE --train.init_from=.gpu/session6/vae_v4/model.safetensors --train.max_minutes=$(left_min 15) > $OUT/vae_A.log 2>&1
  el "vae rc=$?"; tail -3 $OUT/vae_A.log; tail -1 /tmp/vae_run/train_log.jsonl | cut -c1-400;;
B)
  $VAE --resume --train.max_minutes=${B_TRAIN_MIN:-6} > $OUT/vae_B.log 2>&1
  el "vae rc=$?"; tail -1 /tmp/vae_run/train_log.jsonl | cut -c1-400; pack; el packed
  python3 -m d3s2.cli eval vae --data /tmp/d256 --weights /tmp/vae_run/export --split test --samples 50000 --device cuda \
    --json $OUT/vae_v5_eval_test.json > $OUT/vae_v5_eval.log 2>&1
  el "eval rc=$?"; tail -2 $OUT/vae_v5_eval.log;;
C)
  python3 -m d3s2.cli data encode --data /tmp/d256 --vae /tmp/vae_run/export --out /tmp/enc --device cuda --no-progress > $OUT/encode.log 2>&1
  el "encode rc=$?"
  python3 - <<'PY'
from safetensors.torch import load_file, save_file
for name, dit, enc in (("dense", "dense_dit", "conditioner_dense_dit"), ("sparse", "sparse_dit_256", "conditioner_sparse_dit_256")):
    state = {f"dit.{k}": v.float() for k, v in load_file(f".gpu/s7init/{dit}/model.safetensors").items()}
    state.update({f"encoder.{k}": v.float() for k, v in load_file(f".gpu/s7init/{enc}/model.safetensors").items()})
    save_file(state, f"/tmp/init_{name}.safetensors")
PY
  M=$(left_min 60)
  python3 -m d3s2.cli train dit_sparse --config configs/demo/dit_sparse_train.yaml --out /tmp/dit_sparse --train.progress=false \
    --task.args.latents=/tmp/enc --task.args.data=/tmp/d256 --data.num_workers=7 --train.init_from=/tmp/init_sparse.safetensors \
    --optim.warmup_steps=20 --train.max_minutes=$M > $OUT/dit_sparse.log 2>&1 &
  python3 -m d3s2.cli train dense_vae --config configs/demo/dense_vae_train.yaml --out /tmp/dense_vae --train.progress=false \
    --task.args.latents=/tmp/enc --data.num_workers=4 --train.init_from=.gpu/s7init/dense_vae/model.safetensors \
    --optim.warmup_steps=20 --train.max_minutes=${DVAE_MIN:-1.5} > $OUT/dense_vae.log 2>&1
  el "dense vae rc=$?"
  python3 -m d3s2.cli train dit_dense --config configs/demo/dit_dense_train.yaml --out /tmp/dit_dense --train.progress=false \
    --task.args.latents=/tmp/enc --task.args.data=/tmp/d256 --task.args.dense_vae=/tmp/dense_vae/export --data.num_workers=7 \
    --train.init_from=/tmp/init_dense.safetensors --optim.warmup_steps=20 --train.max_minutes=$(left_min 60) > $OUT/dit_dense.log 2>&1
  el "dense dit rc=$?"; wait; el "sparse dit done"
  python3 scripts/assemble_pipeline.py --sparse-vae /tmp/vae_run/export --dense-vae /tmp/dense_vae/export \
    --dense-dit /tmp/dit_dense/export --sparse-dit /tmp/dit_sparse/export --out /tmp/pipeline \
    --dense-steps 20 --sparse-steps 20 --cfg 3.0 --summary $OUT/pipeline_summary.json > $OUT/assemble.log 2>&1
  el "assemble rc=$?"; tar cf - -C /tmp pipeline | split -b 15M - $OUT/pipeline.tar.part-
  tail -2 /tmp/dit_sparse/train_log.jsonl /tmp/dit_dense/train_log.jsonl /tmp/dense_vae/train_log.jsonl | cut -c1-300
  for r in dit_sparse dit_dense dense_vae; do cp /tmp/$r/train_log.jsonl $OUT/${r}_log.jsonl; done
  (cd $OUT && tar czf logs_C.tgz *.log *.json *.jsonl && rm -f *.log *.json *.jsonl);;
D)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
  nvidia-smi -L; el installed
  IGL_NUM_THREADS=1 OMP_NUM_THREADS=1 timeout -s TERM 300 python3 -m d3s2.cli data build 0ad --corpus .gpu/sub/0ad_meshes.npz \
    --resolutions 256 --views 4 --out /tmp/d256 --workers 15 --device cuda --no-progress > $OUT/build.log 2>&1
  el "build rc=$?"; tail -1 $OUT/build.log
  python3 -m d3s2.cli data encode --data /tmp/d256 --vae .gpu/s7v5 --out /tmp/enc --device cuda --no-progress > $OUT/encode.log 2>&1
  el "encode rc=$?"; tail -1 $OUT/encode.log
  timeout ${ORACLE_S:-200} python3 benchmarks/diagnose_vae_latent.py --data /tmp/d256 --weights .gpu/s7v5 --split test \
    --limit ${ORACLE_SHAPES:-10} --iters 300 --band-reference --device cuda --out $OUT/vae_latent_oracle_v5.json > $OUT/vae_oracle.log 2>&1
  el "oracle rc=$?"; tail -3 $OUT/vae_oracle.log;;
E)
  python3 -m d3s2.cli train dit_sparse --config configs/demo/dit_sparse_train.yaml --out /tmp/dit_sparse --train.progress=false \
    --task.args.latents=/tmp/enc --task.args.data=/tmp/d256 --data.num_workers=15 --train.init_from=.gpu/s7sdit/init_sparse.safetensors \
    --optim.warmup_steps=20 --train.max_minutes=$(left_min 45) > $OUT/dit_sparse.log 2>&1
  el "sparse dit rc=$?"; tail -2 $OUT/dit_sparse.log; tail -2 /tmp/dit_sparse/train_log.jsonl | cut -c1-300
  cp /tmp/dit_sparse/train_log.jsonl $OUT/dit_sparse_log.jsonl
  tar cf - -C /tmp/dit_sparse export | split -b 12M - $OUT/dit_sparse_export.tar.part-;;
esac
ls -la $OUT; el "phase $PHASE done"

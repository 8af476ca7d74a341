#!/bin/bash
# GPU call 1: build a 0 A.D. subset at 256³, train the demo SS-VAE on 2 GPUs, evaluate, encode, pack.
T0=$(date +%s); LOG=/tmp/logs; mkdir -p $LOG /tmp/res
el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 D3S2_0AD_NPZ=$PWD/.gpu/data/0ad_meshes.npz
nvidia-smi -L; nproc; el installed
IGL_NUM_THREADS=1 OMP_NUM_THREADS=1 timeout -s TERM ${BUILD_S:-165} python3 -m d3s2.cli data build 0ad --subset 1200 \
  --resolutions 256 --views 4 --out /tmp/d256 --workers 30 --no-progress > $LOG/build.log 2>&1
el "build rc=$?"; tail -3 $LOG/build.log; ls /tmp/d256/assets/0ad/*/ | wc -l
python3 benchmarks/summarize_build.py /tmp/d256 --total 4010 > /tmp/res/build_summary.md 2>&1
export OMP_NUM_THREADS=4
TR="python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m d3s2.cli train vae --config configs/demo/ss_vae_train.yaml --task.args.data=/tmp/d256 --train.progress=false"
$TR --out /tmp/probe --max-steps 30 --train.log_every=10 --train.ckpt_every=0 > $LOG/probe.log 2>&1
el "probe rc=$?"; tail -2 /tmp/probe/train_log.jsonl
STEPS=$(python3 -c "
import json,time;r=[json.loads(l) for l in open('/tmp/probe/train_log.jsonl')][-1]
left=$T0+600-170-40-int(time.time()); print(max(50,int(left/r['step_time_s'])))")
el "training $STEPS steps"
$TR --out /tmp/vae_run --max-steps $STEPS --train.ckpt_every=100000 > $LOG/train.log 2>&1
el "train rc=$?"; tail -2 /tmp/vae_run/train_log.jsonl; cp /tmp/vae_run/train_log.jsonl /tmp/res/
(CUDA_VISIBLE_DEVICES=0 timeout 135 python3 -m d3s2.cli eval vae --data /tmp/d256 --weights /tmp/vae_run/export --split test --samples 50000 \
   --device cuda --json /tmp/res/vae_eval_test.json > $LOG/eval.log 2>&1; echo "eval rc=$?" >> $LOG/eval.log) &
CUDA_VISIBLE_DEVICES=1 timeout 90 python3 scripts/gpu/session2_call1_encode.py /tmp/d256 /tmp/vae_run/export /tmp/enc 256 520 > $LOG/encode.log 2>&1
el "encode rc=$?"
python3 scripts/gpu/session2_call1_pack.py /tmp/d256 /tmp/enc /tmp/vae_run/export /tmp/packdir ${NTRAIN:-450} > $LOG/pack.log 2>&1
el "pack rc=$?"; cat $LOG/pack.log
wait; el "eval done"; cat $LOG/eval.log | tail -12
cp /tmp/vae_run/config.yaml /tmp/vae_run/run.json /tmp/res/ 2>/dev/null
cp $LOG/* /tmp/res/
tar czf $OUT/results.tgz -C /tmp res
split -b 15M -d /tmp/pack.tar $OUT/pack.tar.
ls -la $OUT; el done

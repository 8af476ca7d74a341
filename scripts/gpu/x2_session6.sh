#!/bin/bash
# Session 6, nvidia-h200-x2 (issue 5): SS-VAE training throughput on 1 vs 2 GPUs after the trainer streams all
# epochs through one DataLoader (session 5's profile: every epoch start stalled 0.26-0.45 s forking 14 workers,
# i.e. 10-20 % of the time with this 400-asset build's 10-20 steps per epoch). Same data and settings as
# session4_x2_throughput.sh (session 5b, m = 2); then 2 GPUs with one DDP bucket (all-reduce after the backward
# instead of overlapping it) and with 8 workers per rank. Carried: .gpu/whl, .gpu/sub. ≈ 4 min.
source scripts/gpu/_prelude.sh
IGL_NUM_THREADS=1 OMP_NUM_THREADS=1 timeout -s TERM 75 python3 -m d3s2.cli data build 0ad --corpus .gpu/sub/0ad_meshes.npz \
  --subset 400 --resolutions 256 --views 1 --out /tmp/d256 --workers 28 --device cuda --no-progress > $OUT/build.log 2>&1
el "build rc=$?"
B="python3 benchmarks/bench_train_step.py --task vae --config configs/demo/ss_vae_train.yaml --steps 40 --warmup 10
  --task.args.data=/tmp/d256 --data.max_tokens=3000000 --data.micro_batches_per_step=2"
$B --nproc 1 2 --data.num_workers=14 --out $OUT/train_step_vae_2xH200_session6_m2.json > $OUT/bench_m2.log 2>&1
el "bench m=2 rc=$?"; tail -3 $OUT/bench_m2.log
$B --nproc 2 --data.num_workers=14 --train.ddp_bucket_mb=400 --out $OUT/train_step_vae_2xH200_session6_m2_1bucket.json \
  > $OUT/bench_m2_1bucket.log 2>&1
el "bench m=2 one bucket rc=$?"; tail -2 $OUT/bench_m2_1bucket.log
$B --nproc 2 --data.num_workers=8 --out $OUT/train_step_vae_2xH200_session6_m2_w8.json > $OUT/bench_m2_w8.log 2>&1
el "bench m=2 8 workers rc=$?"; tail -2 $OUT/bench_m2_w8.log

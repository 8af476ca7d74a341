#!/bin/bash
# nvidia-h200-x2 (next session, issue 5): where the two-GPU SS-VAE step loses its 20 % per micro-batch against one
# GPU (session 5: 0.217 s vs 0.179 s per 2.65 M-voxel micro-batch). Same 400-asset build as the throughput script;
# profile_train_step.py on 1 process and under torchrun on 2 (one report per rank: step times, host syncs,
# top operators by self CPU / device time). Carried: .gpu/whl, .gpu/sub. ≈ 4 min.
source scripts/gpu/_prelude.sh
IGL_NUM_THREADS=1 OMP_NUM_THREADS=1 timeout -s TERM 75 python3 -m d3s2.cli data build 0ad --corpus .gpu/sub/0ad_meshes.npz \
  --subset 400 --resolutions 256 --views 1 --out /tmp/d256 --workers 28 --device cuda --no-progress > $OUT/build.log 2>&1
el "build rc=$?"
ARGS="--config configs/demo/ss_vae_train.yaml --task.args.data=/tmp/d256 --data.max_tokens=3000000
  --data.num_workers=14 --warmup 10 --steps 20 --profile-steps 3"
OMP_NUM_THREADS=1 timeout 150 python3 benchmarks/profile_train_step.py $ARGS --data.micro_batches_per_step=1 \
  --out-dir $OUT/p1 > $OUT/p1.log 2>&1
el "1 process rc=$?"; head -4 $OUT/p1/profile_train_step.md
timeout 180 python3 -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/profile_train_step.py $ARGS \
  --data.micro_batches_per_step=2 --out-dir $OUT/p2 > $OUT/p2.log 2>&1
el "2 processes rc=$?"; head -4 $OUT/p2/profile_train_step_rank*.md

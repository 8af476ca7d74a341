#!/bin/bash
# Session 4, nvidia-h200-x2: demo SS-VAE training throughput on 1 vs 2 GPUs (same config, same global batch of
# two 3 M-voxel micro-batches per step) on a 400-asset GPU build of the 1200-asset 0 A.D. subset at 256³.
# Re-run in session 5 after the packed-targets data path (issue 5); also records bench_batch_prep.py there.
source scripts/gpu/_prelude.sh
IGL_NUM_THREADS=1 OMP_NUM_THREADS=1 timeout -s TERM 75 python3 -m d3s2.cli data build 0ad --corpus .gpu/sub/0ad_meshes.npz \
  --subset 400 --resolutions 256 --views 1 --out /tmp/d256 --workers 28 --device cuda --no-progress > $OUT/build.log 2>&1
el "build rc=$?"; python3 benchmarks/summarize_build.py /tmp/d256 --total 400 2>&1 | head -4
# Session 5: host core-seconds per 3 M micro-batch on this machine (workers' items + collate, main process pin + copy).
OMP_NUM_THREADS=1 timeout 90 python3 benchmarks/bench_batch_prep.py --data /tmp/d256 --max-tokens 3000000 --batches 4 \
  --rounds 1 --out $OUT/batch_prep_H200.json > $OUT/batch_prep.log 2>&1
el "batch prep rc=$?"; tail -3 $OUT/batch_prep.log
# Session 5b: the optimizer step no longer syncs the host (fused AdamW skips non-finite steps on the device) and the
# bench logs every 5 steps (a log syncs); global batches of 2 and of 4 micro-batches.
for M in ${MICRO:-2 4}; do
  python3 benchmarks/bench_train_step.py --task vae --config configs/demo/ss_vae_train.yaml --nproc 1 2 --steps 40 \
    --warmup 10 --task.args.data=/tmp/d256 --data.max_tokens=3000000 --data.micro_batches_per_step=$M \
    --data.num_workers=14 --out $OUT/train_step_vae_2xH200_session5b_m$M.json > $OUT/bench_m$M.log 2>&1
  el "bench m=$M rc=$?"; tail -4 $OUT/bench_m$M.log
done
# Session 5: the SS-VAE GPU tests (sync-free step for both batch layouts) on this machine's first GPU.
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/models/vae > $OUT/vae_gpu_tests.txt 2>&1
el "vae gpu tests rc=$?"; tail -3 $OUT/vae_gpu_tests.txt

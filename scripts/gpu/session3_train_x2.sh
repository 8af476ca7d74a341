#!/bin/bash
# Session 3, nvidia-h200-x2: build 400 assets of the corpus subset at 256³ (CPU SDF, 30 workers, no renders), the
# sync-free VAE step's GPU tests, 1- vs 2-GPU demo SS-VAE throughput (same global batch), a one-GPU profile.
T0=$(date +%s); el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi -L; nproc
IGL_NUM_THREADS=1 OMP_NUM_THREADS=1 timeout 120 python3 -m d3s2.cli data build 0ad --corpus .gpu/sub/0ad_meshes.npz --subset 400 \
  --resolutions 256 --views 0 --out /tmp/d256 --workers 30 --no-progress > $OUT/build.log 2>&1
el "build rc=$?"; tail -1 $OUT/build.log
timeout 40 python3 -m pytest -q -x -p no:cacheprovider tests/models/vae/test_sparse_sdf_vae.py::test_training_step_runs_without_host_syncs_on_gpu \
  tests/ops/conv/test_triton_gpu.py -k "sync or (twice and dtype1)" > $OUT/gpu_tests.log 2>&1
el "tests rc=$?"; tail -2 $OUT/gpu_tests.log
timeout 200 python3 benchmarks/bench_train_step.py --task vae --config configs/demo/ss_vae_train.yaml --nproc 1 2 --steps 20 \
  --warmup 10 --task.args.data=/tmp/d256 --out $OUT/train_step_vae_2xH200.json > $OUT/bench.log 2>&1
el "bench rc=$?"; tail -5 $OUT/bench.log
CUDA_VISIBLE_DEVICES=0 timeout 60 python3 benchmarks/profile_train_step.py --config configs/demo/ss_vae_train.yaml --task.args.data=/tmp/d256 \
  --data.micro_batches_per_step=1 --warmup 3 --steps 10 --profile-steps 1 --out-dir $OUT > $OUT/profile.log 2>&1
el "profile rc=$?"; head -24 $OUT/profile_train_step.md

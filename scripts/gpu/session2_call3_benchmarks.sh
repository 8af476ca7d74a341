#!/bin/bash
# GPU call 3: every benchmark of the session, two GPU tracks in parallel, then 1- vs 2-GPU VAE training throughput.
T0=$(date +%s); O=/tmp/o; mkdir -p $O/ssa
el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/c3/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
L=$PWD/.gpu/c3/data/latent_layouts_1024.npz; C=$PWD/.gpu/c3/data/0ad_meshes.npz; export D3S2_0AD_NPZ=$C
git rev-parse HEAD 2>/dev/null > $O/commit.txt; nvidia-smi > $O/nvidia_smi.txt; python3 -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $O/commit.txt
(IGL_NUM_THREADS=1 OMP_NUM_THREADS=1 timeout 120 python3 -m d3s2.cli data build 0ad --subset 160 --seed 7 --resolutions 256 \
   --views 0 --out /tmp/d256t --workers 20 --no-progress > $O/throughput_build.log 2>&1) &
BUILD=$!
(export CUDA_VISIBLE_DEVICES=0
 timeout 160 python3 benchmarks/bench_published.py --layouts $L --out-dir $O > $O/published.log 2>&1; echo "published rc=$? t=$(( $(date +%s) - T0 ))"
 timeout 110 python3 benchmarks/bench_vae.py --corpus $C --assets skeletal/new/m_hero_caros --out-dir $O > $O/vae.log 2>&1; echo "vae rc=$? t=$(( $(date +%s) - T0 ))"
 timeout 130 python3 benchmarks/bench_generate.py --layouts $L --resolutions 512 1024 --repeats 2 --out-dir $O > $O/generate.log 2>&1; echo "generate rc=$? t=$(( $(date +%s) - T0 ))"
) > $O/track0.log 2>&1 &
G0=$!
(export CUDA_VISIBLE_DEVICES=1
 t(){ timeout 120 python3 -m pytest -q -p no:cacheprovider "$@"; }
 t tests/ops/ssa/test_ssa_gpu.py -k bf16 > $O/tests_ssa_gpu_bf16.txt 2>&1 &
 t tests/ops/ssa/test_ssa_gpu.py -k "not bf16" > $O/tests_ssa_gpu_fp32_fp16.txt 2>&1 &
 t tests/ops/block_attn tests/ops/ssa tests/ops/conv --ignore=tests/ops/ssa/test_ssa_gpu.py > $O/tests_ops_rest.txt 2>&1 &
 wait; echo "ssa tests done t=$(( $(date +%s) - T0 ))"
 timeout 150 python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --no-batch --no-shifted --ab --sweep topk,bwd_dkdv --out $O/ssa > $O/bench_ssa_log.txt 2>&1; echo "ssa bench rc=$? t=$(( $(date +%s) - T0 ))"
 (timeout 40 python3 -m pytest tests/geometry/test_sdf.py -q -p no:cacheprovider -k "cuda or label_components" > $O/sdf_gpu_tests.txt 2>&1; true)
 timeout 90 python3 benchmarks/bench_data.py --device cuda --resolution 1024 --backends torch --profile --npz $C --out $O/data_cuda_1024.json \
   --meshes "art|meshes|props|structural|mausoleum_props_02.dae.cached.pmd" "art|meshes|gaia|geo_waterfall_double.dae.cached.pmd" "art|meshes|structural|han_ministry.dae.cached.pmd" > $O/sdf_bench.log 2>&1
 echo "sdf rc=$? t=$(( $(date +%s) - T0 ))"
) > $O/track1.log 2>&1 &
G1=$!
wait $G0 $G1; el "tracks done"; cat $O/track0.log $O/track1.log
wait $BUILD; tail -2 $O/throughput_build.log
OMP_NUM_THREADS=4 timeout $(( 560 - ($(date +%s) - T0) )) python3 benchmarks/bench_train_step.py --task vae --config configs/demo/ss_vae_train.yaml \
  --nproc 1 2 --steps 20 --warmup 10 --task.args.data=/tmp/d256t --out $O/train_step_vae.json > $O/throughput.log 2>&1
el "throughput rc=$?"; tail -5 $O/throughput.log
tar czf $OUT/results.tgz -C /tmp o; ls -la $OUT; el done

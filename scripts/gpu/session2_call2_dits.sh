#!/bin/bash
# GPU call 2: train the demo dense VAE + dense DiT (GPU 0) and sparse DiT (GPU 1) on the call-1 latents, assemble.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/c2/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
VAE_DIR=$PWD/.gpu/c2/vae PYTHON=python3 PACK_DIR=$OUT bash scripts/gpu_train_demo.sh .gpu/c2/build .gpu/c2/latents /tmp/demo ${MINUTES:-7}
echo "rc=$?"; ls -la $OUT

# Sourced by the device-call scripts: elapsed-time logger, carried wheels (.gpu/whl) on PYTHONPATH, layouts path.
T0=$(date +%s); el() { echo "[t=$(( $(date +%s) - T0 ))s] $*"; }
if ls .gpu/whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PYTHONPATH PYTHONUNBUFFERED=1
L=.gpu/layouts/latent_layouts_1024.npz
nvidia-smi -L; el start

# `train.deterministic` on one GPU for every training task (toy, dense_vae, dit_dense, vae, dit_sparse): each trained
# twice for 6 steps from its tiny debug config (two processes), and once resumed from the first run's step-3
# checkpoint; prints PASS / FAIL per task with the losses of the three runs (scripts/gpu/det_tasks.py). Tiny data
# from tests/assets/0ad_tiny.npz (no /work/shared). Training stops BUDGET (200) s after the start and what is left is
# reported as not run, so the script ends within 4 minutes. Carried: .gpu/whl if the machine lacks trimesh & co
# (see _prelude.sh). DEVICE=cpu runs the same check without a GPU; ROOT (default /tmp/det_tasks) holds the data and
# the runs, $OUT (else ROOT) the logs; TASKS picks some of the tasks (det_tasks.py).
# NPROC=2 (on nvidia-h200-x2): every run is 2 ranks under torchrun (DDP over NCCL), with twice the micro-batches per
# step; compare also checks both ranks' RNG states and log windows. CPU smoke run (gloo, 36 s on 2 shared cores):
#   DEVICE=cpu NPROC=2 bash scripts/gpu/det_tasks.sh
# PARALLEL=fsdp (with NPROC > 1): the runs shard each model with FSDP2 instead of DDP.
source scripts/gpu/_prelude.sh
export DEVICE=${DEVICE:-cuda} STEPS=${STEPS:-6}
NPROC=${NPROC:-1}
ROOT=${ROOT:-/tmp/det_tasks}; LOGS=${OUT:-$ROOT}; rm -rf "$ROOT"; mkdir -p "$ROOT" "$LOGS"
BUDGET=${BUDGET:-200}; left() { local s=$(( BUDGET - $(date +%s) + T0 )); echo $(( s > 1 ? s : 1 )); }
python3 -m d3s2.cli doctor 2>&1 | sed -n '/^op backends/,$p'
timeout -k 5 60 python3 scripts/gpu/det_tasks.py data "$ROOT" > "$LOGS/det_data.txt" 2>&1
el "data rc=$?"; tail -1 "$LOGS/det_data.txt"
for phase in a b; do
  # -k 40: torchrun gives its ranks 30 s to stop after the SIGTERM before it kills them.
  timeout -k 40 $(left) python3 scripts/gpu/det_tasks.py train "$ROOT" $phase --nproc "$NPROC" \
    > "$LOGS/det_train_$phase.txt" 2>&1
  el "train $phase rc=$?"; grep -E "^$ROOT/runs/" "$LOGS/det_train_$phase.txt"
done
timeout -k 5 20 python3 scripts/gpu/det_tasks.py compare "$ROOT" --nproc "$NPROC" 2>&1 | tee "$LOGS/det_compare.txt"
el "compare rc=${PIPESTATUS[0]}"

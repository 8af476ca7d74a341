#!/usr/bin/env bash
# Train the demo dense VAE, dense DiT and sparse DiT in MINUTES of wall clock on a 2-GPU machine, then assemble the
# image-to-3D pipeline folder.
#
#   scripts/gpu_train_demo.sh BUILD_DIR ENC_DIR OUT_DIR MINUTES
#
# BUILD_DIR: a `d3s2 data build` folder with renders; ENC_DIR: its `d3s2 data encode` latents (encoded.json names
# the SS-VAE folder, or set VAE_DIR). GPU 0 trains the dense VAE, then the dense DiT on it; GPU 1 trains the sparse
# DiT meanwhile (CUDA_VISIBLE_DEVICES). Every run stops by train.max_minutes, bf16 autocast, EMA weights exported.
#
# Writes OUT_DIR/{dense_vae,dit_dense,dit_sparse}/ (run folders), OUT_DIR/logs/*.log, OUT_DIR/pipeline/ (fp16,
# loadable by `d3s2 generate --weights OUT_DIR/pipeline`) and OUT_DIR/summary.json (final train/val losses, steps,
# tokens/s, wall seconds per run, parameters and size of the pipeline).
#
# Environment: VAE_DIR (SS-VAE folder; default: "vae" of ENC_DIR/encoded.json), PYTHON (default python),
# PACK_DIR (if set: also writes there summary.json, logs.txt and pipeline.tar.part-aa, -ab, ... of at most 15 MiB;
# restore with `cat pipeline.tar.part-* | tar -x`), OVERHEAD_S (seconds budgeted per run for python start-up, the last
# step, final validation and export: max_minutes counts from the trainer's start; default 40),
# DENSE_VAE_FRACTION (share of GPU 0's training time for the dense VAE, default 0.3), TINY=1 (CPU smoke test
# with the configs/debug tiny configs, both "GPUs" on the CPU).
set -euo pipefail

if [ $# -ne 4 ]; then
  echo "usage: $0 BUILD_DIR ENC_DIR OUT_DIR MINUTES" >&2
  exit 2
fi
BUILD=$1; ENC=$2; OUT=$3; MINUTES=$4
PYTHON=${PYTHON:-python}
OVERHEAD_S=${OVERHEAD_S:-40}
DENSE_VAE_FRACTION=${DENSE_VAE_FRACTION:-0.3}
RESERVE_S=40  # assembling, summary and packing after the runs

for f in "$BUILD/build.json" "$ENC/encoded.json"; do
  [ -f "$f" ] || { echo "missing $f" >&2; exit 2; }
done
VAE_DIR=${VAE_DIR:-$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["vae"])' "$ENC/encoded.json")}
[ -f "$VAE_DIR/vae_task.json" ] || { echo "SS-VAE folder $VAE_DIR lacks vae_task.json (set VAE_DIR)" >&2; exit 2; }

if [ "${TINY:-0}" = 1 ]; then
  CFG_DVAE=configs/debug/tiny_dense_vae_train.yaml
  CFG_DDIT=configs/debug/tiny_dit_dense_train.yaml
  CFG_SDIT=configs/debug/tiny_dit_sparse_train.yaml
  GPU0=""; GPU1=""
else
  CFG_DVAE=configs/demo/dense_vae_train.yaml
  CFG_DDIT=configs/demo/dit_dense_train.yaml
  CFG_SDIT=configs/demo/dit_sparse_train.yaml
  GPU0=0; GPU1=1
fi

mkdir -p "$OUT/logs"
START=$(date +%s)
END=$((START + MINUTES * 60 - RESERVE_S))
minutes_left() {  # training minutes for a run started now that must be done by END (one run's overhead kept)
  "$PYTHON" -c 'import sys, time; print(max((int(sys.argv[1]) - time.time() - int(sys.argv[2])) * float(sys.argv[3]) / 60, 0.1))' \
    "$END" "$1" "$2"
}
train() {  # train GPU TASK CONFIG RUN MINUTES [overrides...]
  local gpu=$1 task=$2 cfg=$3 run=$4 minutes=$5
  shift 5
  local t0
  t0=$(date +%s)
  echo "[$(date -u +%T)] $task on GPU '${gpu}' for ${minutes} min -> $OUT/$run"
  local rc=0
  CUDA_VISIBLE_DEVICES=$gpu "$PYTHON" -m d3s2.cli train "$task" --config "$cfg" --out "$OUT/$run" \
    --train.max_minutes="$minutes" --train.progress=false "$@" > "$OUT/logs/$run.log" 2>&1 || rc=$?
  echo "$(( $(date +%s) - t0 ))" > "$OUT/logs/$run.seconds"
  echo "[$(date -u +%T)] $task exited with $rc after $(cat "$OUT/logs/$run.seconds") s (log: $OUT/logs/$run.log)"
  return "$rc"
}

# GPU 1: the sparse DiT for the whole budget.
SPARSE_MIN=$(minutes_left "$OVERHEAD_S" 1)
( train "$GPU1" dit_sparse "$CFG_SDIT" dit_sparse "$SPARSE_MIN" \
    --task.args.latents="$ENC" --task.args.data="$BUILD" ) &
SPARSE_PID=$!

# GPU 0: the dense VAE, then the dense DiT on its export.
DVAE_MIN=$("$PYTHON" -c 'import sys; print(max(float(sys.argv[1]) * float(sys.argv[2]), 0.1))' \
  "$(minutes_left $((2 * OVERHEAD_S)) 1)" "$DENSE_VAE_FRACTION")
DENSE_OK=1
train "$GPU0" dense_vae "$CFG_DVAE" dense_vae "$DVAE_MIN" --task.args.latents="$ENC" || DENSE_OK=0
if [ "$DENSE_OK" = 1 ]; then
  train "$GPU0" dit_dense "$CFG_DDIT" dit_dense "$(minutes_left "$OVERHEAD_S" 1)" \
    --task.args.latents="$ENC" --task.args.data="$BUILD" --task.args.dense_vae="$OUT/dense_vae/export" || DENSE_OK=0
fi
SPARSE_OK=1
wait "$SPARSE_PID" || SPARSE_OK=0

ASSEMBLED=0
if [ "$DENSE_OK" = 1 ] && [ "$SPARSE_OK" = 1 ]; then
  "$PYTHON" scripts/assemble_pipeline.py --sparse-vae "$VAE_DIR" --dense-vae "$OUT/dense_vae/export" \
    --dense-dit "$OUT/dit_dense/export" --sparse-dit "$OUT/dit_sparse/export" --out "$OUT/pipeline" \
    --summary "$OUT/logs/pipeline.json" > "$OUT/logs/assemble.log" 2>&1 && ASSEMBLED=1
fi

"$PYTHON" - "$OUT" "$START" "$MINUTES" "$DENSE_OK" "$SPARSE_OK" "$ASSEMBLED" <<'EOF'
import json, sys, time
from pathlib import Path

out, start, minutes = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
summary = {"minutes_budget": minutes, "dense_ok": sys.argv[4] == "1", "sparse_ok": sys.argv[5] == "1",
           "assembled": sys.argv[6] == "1", "runs": {}}
for run in ("dense_vae", "dit_dense", "dit_sparse"):
    log = out / run / "train_log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    seconds = out / "logs" / f"{run}.seconds"
    tail = train[len(train) // 2:] or train  # the second half: past warm-up and kernel compilation
    summary["runs"][run] = {
        "steps": train[-1]["step"] if train else 0,
        "final_train": train[-1] if train else None,
        "final_val": val[-1] if val else None,
        "tokens_per_s_second_half": (sum(r["tokens_per_s"] for r in tail) / len(tail)) if tail else None,
        "step_time_s_second_half": (sum(r["step_time_s"] for r in tail) / len(tail)) if tail else None,
        "wall_s": int(seconds.read_text()) if seconds.is_file() else None,
    }
pipe = out / "logs" / "pipeline.json"
if pipe.is_file():
    summary["pipeline"] = json.loads(pipe.read_text())
summary["wall_s_total"] = round(time.time() - start, 1)
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps({k: v for k, v in summary.items() if k != "pipeline"}, indent=1)[:4000])
EOF

if [ -n "${PACK_DIR:-}" ]; then
  mkdir -p "$PACK_DIR"
  cp "$OUT/summary.json" "$PACK_DIR/summary.json"
  for f in "$OUT"/logs/*.log; do echo "=== $f"; tail -n 40 "$f"; done > "$PACK_DIR/logs.txt"
  if [ "$ASSEMBLED" = 1 ]; then
    tar -cf - -C "$OUT" pipeline | split -b 15M - "$PACK_DIR/pipeline.tar.part-"
  fi
fi
echo "[$(date -u +%T)] finished in $(( $(date +%s) - START )) s (budget ${MINUTES} min): $OUT/summary.json"
[ "$ASSEMBLED" = 1 ]

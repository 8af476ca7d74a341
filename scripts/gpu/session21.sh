# Session 21, one GPU: every `gpu`-marked test after the user-facing fixes (pipeline CLI / API, registry type checks,
# trainer signals and logs), then `train.deterministic` on CUDA: the tiny SS-VAE trained twice for 6 steps from the
# packaged debug config (run from /tmp: configs/... resolves to the installed copy), losses compared.
# The demo pipeline's weights stay behind (tree size): the tests that need them skip. Carried: .gpu/whl.
source scripts/gpu/_prelude.sh
timeout 400 python3 -m pytest -q -p no:cacheprovider -m gpu -n 4 -rs --timeout 240 tests > $OUT/gpu_tests.txt 2>&1
el "gpu tests rc=$?"; grep -E "passed|failed" $OUT/gpu_tests.txt | tail -2; grep -E "^FAILED|^ERROR" $OUT/gpu_tests.txt | head -20
python3 -m d3s2.cli data build 0ad --corpus tests/assets/0ad_tiny.npz --out /tmp/tiny --resolutions 32 --views 0 \
  --band 0.0625 --device cuda --no-progress > $OUT/build.txt 2>&1
el "build rc=$?"; tail -3 $OUT/build.txt
cd /tmp
for r in a b; do
  timeout 120 python3 -m d3s2.cli train vae --config configs/debug/tiny_vae_train.yaml --out /tmp/run_$r --max-steps 6 \
    --task.args.data=/tmp/tiny --train.deterministic=true --train.log_every=1 --train.val_every=0 \
    > $OUT/train_$r.txt 2>&1
  el "train $r rc=$?"; tail -4 $OUT/train_$r.txt
  cp /tmp/run_$r/train_log.jsonl $OUT/train_log_$r.jsonl 2>/dev/null
done
python3 - <<'PY'
import json, os
rows = [[{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "step_time_s")}
         for line in open(f"{os.environ['OUT']}/train_log_{r}.jsonl")] for r in "ab"]
print("deterministic:", "identical losses" if rows[0] == rows[1] and rows[0] else "DIFFER", len(rows[0]), "steps")
print(rows[0][-1] if rows[0] else None)
PY

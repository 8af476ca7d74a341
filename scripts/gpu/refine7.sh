#!/bin/bash
# Session 7, one H200 (issue 5): SS-VAE v5 on the held-out test shapes with its latent refined at encode time
# (semi-amortised encoding: `d3s2 eval vae --refine-steps`, d3s2.models.vae.refine).
#  1. build the test split of the 1200-asset subset at 256³, no renders: the same shapes and SDFs as the whole
#     subset's build (splits hash the asset name, each asset is built alone), a twentieth of the build time;
#     FULL=1 builds the whole subset as session7_vae.sh phase D does (with --views 0);
#  2. `d3s2 eval vae --refine-steps ${STEPS:-100}` on the test split (all 65 shapes; LIMIT=n for fewer), 50k samples;
#  3. if time is left, the encoder-only baseline on the same shapes (as session 7 phase B scored v5).
# Prints the per-resolution tables and the refinement's seconds per shape (the first shape's includes the warm-up).
# Per-shape metrics go to /tmp/refine${STEPS}_shapes.jsonl (and $OUT): a call killed by its cap resumes there when
# the script runs again on the same warm machine (the build is skipped as already done).
# Carried: .gpu/whl, .gpu/sub/0ad_meshes.npz, .gpu/s7v5. Ends by CALL_S (560) seconds. Session 8 ran all 65 in one call
# (465 s) with SRC=.gpu/test65_0ad.npz W=src/d3s2/assets/ss_vae_256, carrying only .gpu/whl and that corpus.
# CPU smoke test (tiny): OUT=/tmp/o DATA=/tmp/o_data WORKERS=2 SRC=tests/assets/0ad_tiny.npz W=<tiny export> DEV=cpu RES=32 SPLIT=train STEPS=2
source scripts/gpu/_prelude.sh
CALL_S=${CALL_S:-560}
STEPS=${STEPS:-100}
DATA=${DATA:-/tmp/d256}; W=${W:-.gpu/s7v5}; DEV=${DEV:-cuda}; RES=${RES:-256}; SPLIT=${SPLIT:-test}
left() { echo $(( T0 + CALL_S - $(date +%s) )); }
export SRC=${SRC:-.gpu/sub/0ad_meshes.npz} SPLIT
CORPUS=$SRC
if [ -z "$FULL" ]; then
  python3 - <<'PY' || exit 1
import os

from d3s2.data.corpus import MeshCorpus, save_corpus
from d3s2.data.dataset import split_of

corpus = MeshCorpus(os.environ["SRC"])
test = {n: corpus.arrays(n) for n in corpus.names() if split_of(f"0ad/{n}") == os.environ["SPLIT"]}
save_corpus("/tmp/test_0ad.npz", test)
print(f"{len(test)} {os.environ['SPLIT']} meshes of {len(corpus)}")
PY
  CORPUS=/tmp/test_0ad.npz
fi
IGL_NUM_THREADS=1 OMP_NUM_THREADS=1 timeout -s TERM 300 python3 -m d3s2.cli data build 0ad --corpus $CORPUS \
  --resolutions $RES --views 0 --out $DATA --workers ${WORKERS:-15} --device $DEV --no-progress > $OUT/build.log 2>&1
el "build rc=$?"; tail -1 $OUT/build.log
JSON=$OUT/vae_v5_eval_test_refine${STEPS}.json
timeout -s TERM $(( $(left) - 10 )) python3 -m d3s2.cli eval vae --data $DATA --weights $W --split $SPLIT \
  --samples 50000 --device $DEV --limit ${LIMIT:-0} --refine-steps $STEPS --json $JSON \
  --per-shape /tmp/refine${STEPS}_shapes.jsonl > $OUT/eval_refine.log 2>&1
RC=$?; el "eval (refine $STEPS) rc=$RC"; grep -v "it/s\|s/it" $OUT/eval_refine.log | tail -4
cp /tmp/refine${STEPS}_shapes.jsonl $OUT/  # per shape; a killed run resumes from it when called again on this machine
[ $RC = 0 ] || tr '\r' '\n' < $OUT/eval_refine.log | grep "it/s\|s/it" | tail -1  # killed: how far it got, how fast
[ -f $JSON ] && python3 - $JSON $STEPS <<'PY'
import json, sys

d = json.load(open(sys.argv[1]))
steps = int(sys.argv[2])
for r, m in d["results"].items():
    n = int(m["shapes"])
    warm = (m["refine_seconds"] * n - m["refine_seconds_first"]) / max(n - 1, 1)
    print(f"{r}^3 refine {d['refine']}: {m['refine_seconds']:.2f} s/shape over {n} shapes "
          f"(first {m['refine_seconds_first']:.1f} s; without it {warm:.2f} s/shape = {1000 * warm / (steps + 1):.1f} "
          f"ms/step), loss {m['refine_loss_start']:.4f} -> {m['refine_loss_end']:.4f}")
PY
if [ $(left) -gt 150 ]; then
  timeout -s TERM $(( $(left) - 10 )) python3 -m d3s2.cli eval vae --data $DATA --weights $W --split $SPLIT \
    --samples 50000 --device $DEV --limit ${LIMIT:-0} --json $OUT/vae_v5_eval_test_refine0.json > $OUT/eval_base.log 2>&1
  el "eval (encoder only) rc=$?"; grep -v "it/s\|s/it" $OUT/eval_base.log | tail -3
fi
ls -la $OUT; el done

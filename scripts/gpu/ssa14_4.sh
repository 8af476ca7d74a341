# Issue 4, session 14, call 4: the SSA layer's training step regressed (v1.1 fwd+bwd 45.96 ms in session 2, 437 ms in
# call 3). The compression's block mean now backpropagates by a gather instead of autograd's index_put over the
# padded rows. Layer tests on the GPU; old (07fab46's models/attention/ssa.py, carried as .gpu/old/ssa.py) and new
# layer times alternated; kernel profile of both training steps.
source scripts/gpu/_prelude.sh
python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/models/attention > $OUT/tests.txt 2>&1
tail -3 $OUT/tests.txt
el tests
rm -rf /tmp/oldsrc && cp -r src /tmp/oldsrc && cp .gpu/old/ssa.py /tmp/oldsrc/d3s2/models/attention/ssa.py
for r in 1 2; do
  PYTHONPATH=/tmp/site:/tmp/oldsrc python3 scripts/gpu/ssa_module_ms.py --layouts $L --tag old 2>&1 | grep '^{' | tee -a $OUT/module.jsonl
  python3 scripts/gpu/ssa_module_ms.py --layouts $L --tag new 2>&1 | grep '^{' | tee -a $OUT/module.jsonl
done
el times
PYTHONPATH=/tmp/site:/tmp/oldsrc python3 scripts/gpu/ssa_module_ms.py --layouts $L --tag old --profile > $OUT/profile_old.md 2>&1
python3 scripts/gpu/ssa_module_ms.py --layouts $L --tag new --profile > $OUT/profile_new.md 2>&1
grep -v Warn $OUT/profile_old.md | grep -v '^{' | head -40 | cut -c1-150
grep -v Warn $OUT/profile_new.md | grep -v '^{' | head -40 | cut -c1-150
el profile

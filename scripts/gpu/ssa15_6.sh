# Issue 4, session 15, call 6: the selection / window forward with shift "first" (each row's largest logit of the
# block's first key chunk as the fixed shift: no |q| norms, no key-norm pass, no underflow rerun) against the
# default ("bound" for the selection, "online" for the window): block-attention GPU tests, then the interleaved A/B
# (scripts/gpu/ssa_ab.py, 4 rounds) at N = 134k.
source scripts/gpu/_prelude.sh
python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/ops/block_attn > $OUT/tests.txt 2>&1
tail -2 $OUT/tests.txt
el tests
python3 scripts/gpu/ssa_ab.py --layouts $L --kernels slc,win --rounds 4 --variants '{"base": {},
  "first": {"slc": {"shift": "first"}, "win": {"shift": "first"}}}' 2>&1 | grep -v Warn | tee $OUT/ab.md
el ab

# Issue 4, session 15, call 3: a block's last keys in one masked chunk, 16 keys wide when they fit ("tail": "one"),
# against the 32-key masked tail; register caps; interleaved A/B of the selection and window forwards
# (scripts/gpu/ssa_ab.py), then every kernel of the selection forward and of the whole SSA forward (profile).
# Ran on branch tail15 (25f7222: the tail option lives there only).
source scripts/gpu/_prelude.sh
python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/ops/block_attn > $OUT/tests.txt 2>&1
tail -2 $OUT/tests.txt
el tests
python3 scripts/gpu/ssa_ab.py --layouts $L --kernels slc,win --rounds 3 --variants '{"base": {},
  "tail16": {"slc": {"tail": "one", "TAIL_N": 16}, "win": {"tail": "one", "TAIL_N": 16}},
  "cap88": {"slc": {"maxnreg": 88}}, "tail16_cap88": {"slc": {"tail": "one", "TAIL_N": 16, "maxnreg": 88}}}' 2>&1 \
    | grep -v Warn | tee $OUT/ab.md
el ab
python3 scripts/gpu/ssa_kernel_profile.py --layouts $L --rows 40 2>&1 | grep '^|\|^#' | cut -c1-170 > $OUT/profile.md
cat $OUT/profile.md
el profile

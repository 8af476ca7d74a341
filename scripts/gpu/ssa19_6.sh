# Issue 4, session 19, call 6: more warps per SM for the two-warpgroup compressed forward (32-key chunks at 64
# registers: no spill, 4 CTAs per SM; four warpgroups on 256 rows) and the window (256 rows of four warpgroups;
# 56 registers), A/B interleaved at N = 134k. Separate invocations: a ptxas failure stops only its own.
source scripts/gpu/_prelude.sh
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --kernels cmp --variants '{"base": {},
  "c32r64s2": {"cmp": {"BLOCK_C": 32, "maxnreg": 64, "num_stages": 2}},
  "c32r64s3": {"cmp": {"BLOCK_C": 32, "maxnreg": 64}},
  "w16": {"cmp": {"rows": 256, "num_warps": 16}}}' 2>&1 | grep -v Warn | tee $OUT/ab_cmp.txt
el ab_cmp
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --kernels win --variants '{"base": {},
  "w16": {"win": {"BLOCK_M": 256, "num_warps": 16}}}' 2>&1 | grep -v Warn | tee $OUT/ab_win16.txt
el ab_win16
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --kernels win --variants '{"base": {},
  "r56": {"win": {"maxnreg": 56}}}' 2>&1 | grep -v Warn | tee $OUT/ab_win56.txt
el ab_win56

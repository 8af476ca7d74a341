# Issue 4, session 12, call 4: occupancy the other way: smaller tiles under lower register caps (ptxas sm_90, no
# spill: compressed forward with 32-block tiles at 64 registers = 8 CTAs per SM, at 72 = 7; selection with 64-row
# tiles at 72 = 7 CTAs, 64 = 8 with a 4-byte spill) against the defaults (80: 6 CTAs; 96: 5). scripts/gpu/ssa_ab.py.
source scripts/gpu/_prelude.sh
python3 scripts/gpu/ssa_ab.py --layouts $L --kernels cmp --rounds 3 --variants '{"default": {}, "c32_cap64": {"cmp": {"BLOCK_C": 32, "maxnreg": 64}}, "c32_cap72": {"cmp": {"BLOCK_C": 32, "maxnreg": 72}}, "c32_cap64_3st": {"cmp": {"BLOCK_C": 32, "maxnreg": 64, "num_stages": 3}}}' 2>&1 | grep -v Warn | tee $OUT/cmp_occ.md
el cmp
python3 scripts/gpu/ssa_ab.py --layouts $L --kernels slc --rounds 3 --variants '{"default": {}, "m64_cap72": {"slc": {"BLOCK_M": 64, "maxnreg": 72}}, "m64_cap64": {"slc": {"BLOCK_M": 64, "maxnreg": 64}}, "m64_cap80": {"slc": {"BLOCK_M": 64, "maxnreg": 80}}}' 2>&1 | grep -v Warn | tee $OUT/slc_occ.md
el slc

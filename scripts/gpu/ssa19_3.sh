# Issue 4, session 19, call 3: two warpgroups per CTA in the other attention kernels (call 2: the compressed forward
# on 128-row tiles of 8 warps, 3 stages, 1.72-1.73 against 1.74-1.84 ms): the selection and window forwards, their
# backward (dQ, dK/dV) and the compressed backward, at 8 warps with register caps around their 4-warp points.
# A/B interleaved at N = 134k.
source scripts/gpu/_prelude.sh
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --kernels slc,win --variants '{"base": {},
  "w8r96": {"slc": {"num_warps": 8}, "win": {"num_warps": 8, "BLOCK_M": 128}},
  "w8r80": {"slc": {"num_warps": 8, "maxnreg": 80}, "win": {"num_warps": 8, "BLOCK_M": 128, "maxnreg": 80}},
  "w8r64": {"slc": {"num_warps": 8, "maxnreg": 64}, "win": {"num_warps": 8, "BLOCK_M": 128, "maxnreg": 64}}}' 2>&1 | grep -v Warn | tee $OUT/ab_fwd.txt
el ab_fwd
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --kernels slc_bwd,win_bwd,cmp_bwd --variants '{"base": {},
  "kv8": {"bkv": {"num_warps": 8}},
  "dq8": {"bdq": {"num_warps": 8}},
  "cmp8": {"bwd_dq": {"num_warps": 8}, "bwd_dkdv": {"num_warps": 8}}}' 2>&1 | grep -v Warn | tee $OUT/ab_bwd.txt
el ab_bwd

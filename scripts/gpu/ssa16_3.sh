# Issue 4, session 16, call 3: the compressed backward's launch configs. ptxas for sm_90 counts 208 registers per
# thread for dQ (128-row tiles: 2 CTAs per SM) and 145 for dK/dV (3 CTAs); smaller tiles and register caps (now
# passed for 16-bit inputs of the paper's shape, as in the forwards), A/B interleaved in one process on the v1.1 and
# v1.0 layouts at N = 134k (kernel "cmp_bwd": both kernels and the chunk sum).
source scripts/gpu/_prelude.sh
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --kernels cmp_bwd --variants '{"base": {},
  "dq64": {"bwd_dq": {"rows": 64}}, "dq64r96": {"bwd_dq": {"rows": 64, "maxnreg": 96}},
  "dq64c32r80": {"bwd_dq": {"rows": 64, "BLOCK_C": 32, "maxnreg": 80}}, "dq128c32": {"bwd_dq": {"BLOCK_C": 32}},
  "kv32": {"bwd_dkdv": {"rows": 32}}, "kv32s3": {"bwd_dkdv": {"rows": 32, "num_stages": 3}},
  "kv64r128": {"bwd_dkdv": {"maxnreg": 128}}}' 2>&1 | grep -v Warn | tee $OUT/v11.txt
el v11
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 2 --m-cmp 4 --kernels cmp_bwd --variants '{"base": {},
  "dq64r96": {"bwd_dq": {"rows": 64, "maxnreg": 96}}, "dq64c32r80": {"bwd_dq": {"rows": 64, "BLOCK_C": 32, "maxnreg": 80}},
  "kv32": {"bwd_dkdv": {"rows": 32}}}' 2>&1 | grep -v Warn | tee $OUT/v10.txt
el v10

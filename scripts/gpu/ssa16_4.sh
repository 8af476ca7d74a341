# Issue 4, session 16, call 4: the compressed backward, round 2 (call 3: dK/dV on 32-row steps with 3 stages 6.24
# against 6.98 ms on v1.1; dQ 128-row tiles of 32 blocks 6.87; v1.0 preferred the defaults). Combinations, both layouts.
source scripts/gpu/_prelude.sh
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --kernels cmp_bwd --variants '{"base": {},
  "kv32s3": {"bwd_dkdv": {"rows": 32, "num_stages": 3}}, "kv64s3": {"bwd_dkdv": {"num_stages": 3}},
  "kv16s3": {"bwd_dkdv": {"rows": 16, "num_stages": 3}},
  "kv32s3pps12": {"bwd_dkdv": {"rows": 32, "num_stages": 3, "programs_per_sm": 12}},
  "kv32s3_dq128c32": {"bwd_dkdv": {"rows": 32, "num_stages": 3}, "bwd_dq": {"BLOCK_C": 32}},
  "kv32s3_dq64r96": {"bwd_dkdv": {"rows": 32, "num_stages": 3}, "bwd_dq": {"rows": 64, "maxnreg": 96}},
  "kv32s3_dqs3": {"bwd_dkdv": {"rows": 32, "num_stages": 3}, "bwd_dq": {"num_stages": 3}}}' 2>&1 | grep -v Warn \
  | tee $OUT/v11.txt
el v11
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 2 --m-cmp 4 --kernels cmp_bwd --variants '{"base": {},
  "kv32s3": {"bwd_dkdv": {"rows": 32, "num_stages": 3}}, "kv64s3": {"bwd_dkdv": {"num_stages": 3}},
  "kv32s3_dq128c32": {"bwd_dkdv": {"rows": 32, "num_stages": 3}, "bwd_dq": {"BLOCK_C": 32}}}' 2>&1 \
  | grep -v Warn | tee $OUT/v10.txt
el v10

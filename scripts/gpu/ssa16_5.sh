# Issue 4, session 16, call 5: the selection / window backward's launch configs (block_attn BWD_DQ_CONFIG and
# BWD_DKDV_CONFIG, shared by both). ptxas for sm_90: dK/dV 252 registers per thread at 128 × 64 (2 CTAs per SM),
# 162 at 64-row steps, 126 at 32, 94 at 16; dQ 122. A/B interleaved in one process, v1.1 at N = 134k.
source scripts/gpu/_prelude.sh
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 2 --kernels slc_bwd,win_bwd --variants '{"base": {},
  "kv64": {"bkv": {"BLOCK_M": 64}}, "kv32": {"bkv": {"BLOCK_M": 32}}, "kv32s3": {"bkv": {"BLOCK_M": 32, "num_stages": 3}},
  "kv16s3": {"bkv": {"BLOCK_M": 16, "num_stages": 3}}, "kv64n32": {"bkv": {"BLOCK_M": 64, "BLOCK_N": 32}},
  "dq64": {"bdq": {"BLOCK_M": 64}}, "dqs3": {"bdq": {"num_stages": 3}}}' 2>&1 | grep -v Warn | tee $OUT/ab.txt
el ab

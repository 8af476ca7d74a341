# Issue 4, session 19, call 2: the compressed forward on 128-row tiles of two warpgroups (call 1: 1.72 against
# 1.80-1.83 ms with 3 stages) around that point (4 stages, 32-key chunks), also on v1.0's compression blocks; the
# top-k on 128-block tiles of two warpgroups (64 lists); and the leanest exp pass Triton compiles over the same logits
# (scripts/gpu/exp_pass_probe.py). A/B interleaved at N = 134k.
source scripts/gpu/_prelude.sh
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --kernels cmp,topk --variants '{"base": {},
  "w8s3": {"cmp": {"rows": 128, "num_warps": 8, "num_stages": 3}},
  "w8s4": {"cmp": {"rows": 128, "num_warps": 8, "num_stages": 4}},
  "w8c32": {"cmp": {"rows": 128, "num_warps": 8, "num_stages": 3, "BLOCK_C": 32}},
  "tk128": {"topk": {"BLOCK_J": 128, "num_warps": 8, "lists": 64}},
  "tk128r88": {"topk": {"BLOCK_J": 128, "num_warps": 8, "lists": 64, "maxnreg": 88}}}' 2>&1 | grep -v Warn | tee $OUT/ab.txt
el ab
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --m-cmp 4 --kernels cmp --variants '{"base": {},
  "w8s3": {"cmp": {"rows": 128, "num_warps": 8, "num_stages": 3}}}' 2>&1 | grep -v Warn | tee $OUT/ab_v10.txt
el ab_v10
python3 scripts/gpu/exp_pass_probe.py --layouts $L 2>&1 | grep -v Warn | tee $OUT/probe.txt
el probe

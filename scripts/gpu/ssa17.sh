# Issue 4, session 17, call 1: the probabilities' 16-bit conversion runs on the exponential's pipe (session 15), so
# two options take it out. Top-k head_sum "regs": the 16 heads of a token summed by float32 adds inside each
# thread (rows ordered so that the wgmma accumulator holds them in one thread's registers) instead of converting P
# to float16 for the group matmul (ptxas sm_90: 96 registers, 0 F2FP, no spill). Compressed forward pv "tf32":
# P·V in tf32 against a float32 copy of the compressed values (F2FP 72 → 8). A/B interleaved in one process, v1.1
# and v1.0 layouts at N = 134k, against the defaults, with register caps around each.
# The pv option lived only in that call's working tree: 3.3x slower, removed (ssa_NVIDIA_H200.md, session 17).
source scripts/gpu/_prelude.sh
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --kernels cmp,topk --variants '{"base": {},
  "regs": {"topk": {"head_sum": "regs"}}, "regs88": {"topk": {"head_sum": "regs", "maxnreg": 88}},
  "regs112": {"topk": {"head_sum": "regs", "maxnreg": 112}}, "regs0": {"topk": {"head_sum": "regs", "maxnreg": 0}},
  "tf32": {"cmp": {"pv": "tf32"}}, "tf32r96": {"cmp": {"pv": "tf32", "maxnreg": 96}},
  "tf32r104": {"cmp": {"pv": "tf32", "maxnreg": 104}}, "tf32r0": {"cmp": {"pv": "tf32", "maxnreg": 0}},
  "tf32s3": {"cmp": {"pv": "tf32", "num_stages": 3, "maxnreg": 104}}}' 2>&1 | grep -v Warn | tee $OUT/v11.txt
el v11
python3 scripts/gpu/ssa_ab.py --layouts $L --m-cmp 4 --rounds 2 --kernels cmp,topk --variants '{"base": {},
  "regs": {"topk_seg": {"head_sum": "regs"}}, "regs112": {"topk_seg": {"head_sum": "regs", "maxnreg": 112}},
  "regs0": {"topk_seg": {"head_sum": "regs", "maxnreg": 0}}, "tf32": {"cmp": {"pv": "tf32"}},
  "tf32r104": {"cmp": {"pv": "tf32", "maxnreg": 104}}}' 2>&1 | grep -v Warn | tee $OUT/v10.txt
el v10
python3 -m pytest -q -p no:cacheprovider -x --timeout 300 tests/ops/ssa/test_triton_compress.py \
    tests/ops/ssa/test_ssa_gpu.py -k "head_sum or rows_lanes or pv_tf32 or unconverted" > $OUT/tests.txt 2>&1
tail -3 $OUT/tests.txt
el tests

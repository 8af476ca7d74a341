# Issue 4, session 17, call 2: P for P·V by truncation to bfloat16 (one PRMT per pair on the integer pipe) after a
# compensating scale 2^0.00407 folded into the fixed softmax shift (p_cast "trunc"), in the compressed, selection
# and window forwards, against the rounding conversion (F2FP on the exponential's pipe; ptxas sm_90, compressed
# forward: F2FP 72 → 40, PRMT + 32). The top-k's in-register head sum again, register caps 80-96. A/B interleaved
# in one process, v1.1 at N = 134k; then the GPU tests of both options.
# The p_cast option lived only in that call's working tree: no gain, removed (ssa_NVIDIA_H200.md, session 17).
source scripts/gpu/_prelude.sh
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --kernels cmp,topk,slc,win --variants '{"base": {},
  "trunc": {"cmp": {"p_cast": "trunc"}, "slc": {"p_cast": "trunc"}, "win": {"p_cast": "trunc"}},
  "regs96": {"topk": {"head_sum": "regs"}}, "regs88": {"topk": {"head_sum": "regs", "maxnreg": 88}},
  "regs80": {"topk": {"head_sum": "regs", "maxnreg": 80}}, "regs88s2": {"topk": {"head_sum": "regs", "maxnreg": 88, "num_stages": 2}},
  "trunc_c88": {"cmp": {"p_cast": "trunc", "maxnreg": 88}}, "trunc_c72": {"cmp": {"p_cast": "trunc", "maxnreg": 72}}}' \
  2>&1 | grep -v Warn | tee $OUT/v11.txt
el v11
python3 -m pytest -q -p no:cacheprovider -x --timeout 300 tests/ops/ssa/test_ssa_gpu.py tests/ops/block_attn/test_triton.py \
    -k "unconverted or trunc" > $OUT/tests.txt 2>&1
tail -3 $OUT/tests.txt
el tests

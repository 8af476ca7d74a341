# Issue 4, session 18, call 2: the top-k's two fixed rounds as "the larger candidate, then the smaller, into the
# weakest slot" (ptxas sm_90: 686 instructions per key tile against 710), register caps 88 / 80, against the counted
# rounds; v1.0's top-k (one list) with 32 lists in fixed rounds. A/B interleaved in one process at N = 134k. Then
# the complete benchmark (every size, both configs, the batch, the odd layer, the module: the README's by-size
# table and the selection on the complete run's later draw).
source scripts/gpu/_prelude.sh
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --kernels topk --variants '{"base": {},
  "cap80": {"topk": {"maxnreg": 80}}, "counted": {"topk": {"fixed_rounds": false}}}' \
  2>&1 | grep -v Warn | tee $OUT/v11.txt
el v11
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --m-cmp 4 --kernels topk --variants '{"base": {},
  "lists32": {"topk_seg": {"lists": 32, "fixed_rounds": true}},
  "lists32_c112": {"topk_seg": {"lists": 32, "fixed_rounds": true, "maxnreg": 112}}}' \
  2>&1 | grep -v Warn | tee $OUT/v10.txt
el v10
mkdir -p $OUT/full
timeout 420 python3 benchmarks/bench_ssa.py --layouts $L --out $OUT/full --commit "${COMMIT}" 2>&1 \
    | grep '^| v1\|^Selection' | cut -c1-250
el full

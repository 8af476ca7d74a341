# Issue 4, session 15, call 1: is F2FP (the float32 → bfloat16 conversion of P) on the slow pipe of MUFU.EX2?
# The rate microbenchmark, the GPU tests of the new options, then bench_ssa.py v1.1 at N = 134k sweeping them:
# p_cast "alu" (P and dS rounded on the ALU pipe) in the compressed forward / backward, selection and window
# forwards; p_dot "tf32" in the top-k; then the selection backward with and without p_cast "alu".
# Ran on branch cast15 (9df24fa: the p_cast / p_dot options and slc_bwd_ms.py's alu variant live there only).
source scripts/gpu/_prelude.sh
python3 scripts/gpu/cvt_rate.py 2>&1 | tee $OUT/cvt_rate.jsonl
el cvt_rate
python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/ops/block_attn/test_triton.py \
    tests/ops/ssa/test_triton_compress.py > $OUT/tests.txt 2>&1
tail -3 $OUT/tests.txt
el tests
mkdir -p $OUT/bench
timeout 420 python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --configs v1.1 --no-batch --no-shifted \
    --no-module --sweep fwd,topk,bwd_dq,bwd_dkdv,slc,win --out $OUT/bench --commit "${COMMIT}" 2>&1 \
    | grep -v Warn | cut -c1-400 | tail -40
el bench
python3 scripts/gpu/slc_bwd_ms.py --layouts $L --variants split,alu --rounds 2 2>&1 | grep '^{' | tee $OUT/slc_bwd.jsonl
el slc_bwd

# Issue 4, session 11, call 1: the selection plan by a Triton counting sort (PLAN_METHOD "auto": count on CUDA).
# GPU tests (summary in $OUT/tests.txt), GPU time per kernel of the selection forward (plan by sort and by count)
# and of the whole SSA forward, then bench_ssa v1.1 at N = 134k with the plan and selection sweeps.
source scripts/gpu/_prelude.sh
python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/ops/ssa tests/ops/block_attn tests/flow/test_cuda_graph.py \
    tests/models/attention/test_ssa.py > $OUT/tests.txt 2>&1
tail -3 $OUT/tests.txt
el tests
python3 scripts/gpu/ssa_kernel_profile.py --layouts $L > $OUT/profile.md 2>&1
cat $OUT/profile.md | cut -c1-160
el profile
B="python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --configs v1.1 --no-batch --no-shifted --no-module"
mkdir -p $OUT/sweep
$B --out $OUT/sweep --commit "${COMMIT}" --sweep plan,slc 2>&1 | grep "^| \(plan\|slc\)\|^| v1.1\|^Selection" | cut -c1-330
el sweep
tail -3 $OUT/tests.txt

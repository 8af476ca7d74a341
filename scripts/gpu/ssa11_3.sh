# Issue 4, session 11, call 3: main after the plan experiments were dropped (the only kernel-side change left: max |v|
# in one reduction). GPU tests (summary in $OUT/tests.txt), GPU time per kernel, bench_ssa v1.1 at N = 134k (with
# the forward without autograd).
source scripts/gpu/_prelude.sh
python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/ops/ssa tests/ops/block_attn tests/flow/test_cuda_graph.py \
    tests/models/attention/test_ssa.py > $OUT/tests.txt 2>&1
tail -3 $OUT/tests.txt
el tests
python3 scripts/gpu/ssa_kernel_profile.py --layouts $L --rows 14 > $OUT/profile.md 2>&1
grep -v Warn $OUT/profile.md | cut -c1-140
el profile
B="python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --configs v1.1 --no-batch --no-shifted --no-module"
mkdir -p $OUT/main
$B --out $OUT/main --commit "${COMMIT}" 2>&1 | grep "^| v1.1\|^Selection\|^SSA forward" | cut -c1-330
el bench

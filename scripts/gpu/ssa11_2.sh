# Issue 4, session 11, call 2: the forward-only selection plan by integer atomics (auto on CUDA without autograd),
# rows of a forward tile independent of their tile-mates. GPU tests (summary in $OUT/tests.txt), GPU time per
# kernel (selection forward with each plan, whole SSA forward without autograd), bench_ssa v1.1 at N = 134k with the
# plan and selection sweeps (the JSON of that run is the session's result).
source scripts/gpu/_prelude.sh
python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/ops/ssa tests/ops/block_attn tests/flow/test_cuda_graph.py \
    tests/models/attention/test_ssa.py > $OUT/tests.txt 2>&1
tail -3 $OUT/tests.txt
el tests
python3 scripts/gpu/ssa_kernel_profile.py --layouts $L --rows 14 > $OUT/profile.md 2>&1
grep -v Warn $OUT/profile.md | cut -c1-140
el profile
B="python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --configs v1.1 --no-batch --no-shifted --no-module"
mkdir -p $OUT/sweep
$B --out $OUT/sweep --commit "${COMMIT}" --sweep plan,slc 2>&1 | grep "^| \(plan\|slc\)\|^| v1.1\|^Selection\|^SSA forward" | cut -c1-330
el sweep
tail -3 $OUT/tests.txt

# Issue 4, session 9: the top-k's running lists per token (option "lists"): the SSA / compressed-kernel GPU tests,
# then bench_ssa v1.1 at N = 134k with a top-k sweep (lists 4 / 16 / 32, 32 with 96 registers) whose winner the
# forward row then uses.
source scripts/gpu/_prelude.sh
python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/ops/ssa tests/flow/test_cuda_graph.py 2>&1 | tail -4
el tests
python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --configs v1.1 --no-batch --no-shifted --no-module \
    --sweep topk --out $OUT --commit "${COMMIT:-lanes9}" 2>&1 | grep -v "^{\"config" | cut -c1-400
el bench

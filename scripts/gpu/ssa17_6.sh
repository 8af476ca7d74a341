# Issue 4, session 17, call 6: call 5's GPU tests failed some cases (its summary was cut by the time limit): the SSA
# and block-attention tests again, one line per result (-v), failures' tracebacks as they happen (-x off, --tb=line
# at the end), per-test limit 500 s.
source scripts/gpu/_prelude.sh
timeout 560 python3 -m pytest -v -p no:cacheprovider -n 8 --timeout 500 --tb=line -rf tests/ops/ssa tests/ops/block_attn \
    > $OUT/tests.txt 2>&1
grep -E "FAILED|ERROR|passed|failed" $OUT/tests.txt | tail -40
el tests

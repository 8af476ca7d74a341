#!/bin/bash
# Session 6, one H200, the merged tree after the last fixes (float16 keeps the online softmax shift; no register cap
# on the top-k): every gpu-marked test (4 xdist workers), then bench_ssa v1.1 at N = 133,758 (defaults vs session 5).
# Carried: .gpu/whl, .gpu/layouts. ≈ 4 min.
source scripts/gpu/_prelude.sh
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu -n 4 -rs --timeout 240 tests > $OUT/gpu_tests.txt 2>&1
el "gpu tests rc=$?"; grep -E "passed|failed" $OUT/gpu_tests.txt | tail -2; grep -E "^FAILED|^ERROR|^E   .*Error" $OUT/gpu_tests.txt | head -8
timeout 100 python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --configs v1.1 --no-batch --no-shifted \
  --no-module --ab --out $OUT/bench > $OUT/bench_log.txt 2>&1
el "bench rc=$?"; grep "^| v1.1" $OUT/bench_log.txt; grep "Selection forward" $OUT/bench_log.txt

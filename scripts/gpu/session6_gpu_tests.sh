#!/bin/bash
# Session 6, one H200: every `gpu`-marked test of the merged tree (4 pytest-xdist workers share the GPU; Triton
# compilation dominates). The demo pipeline's weights stay behind (tree size limit): the tests that need them skip.
# Carried: .gpu/whl. ≈ 5 min.
source scripts/gpu/_prelude.sh
timeout ${TEST_S:-540} python3 -m pytest -q -p no:cacheprovider -m gpu -n 4 -rs --durations=15 --timeout 240 tests \
  > $OUT/gpu_tests.txt 2>&1
el "gpu tests rc=$?"; grep -E "passed|failed|error" $OUT/gpu_tests.txt | tail -3; grep -E "^FAILED|^ERROR" $OUT/gpu_tests.txt | head -20

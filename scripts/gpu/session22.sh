# Session 22, one GPU: read / write / copy bandwidth against working-set size (issue 4's L2 arithmetic:
# scripts/gpu/l2_bandwidth.py), every `gpu`-marked test after the session's fixes, then `train.deterministic` and
# resume for every training task (scripts/gpu/det_tasks.sh, its own 200 s budget). The demo pipeline's weights stay
# behind (tree size): the tests that need them skip. Carried: .gpu/whl.
source scripts/gpu/_prelude.sh
timeout 120 python3 scripts/gpu/l2_bandwidth.py > $OUT/l2_bandwidth.txt 2>&1
el "l2 rc=$?"; tail -3 $OUT/l2_bandwidth.txt
timeout 280 python3 -m pytest -q -p no:cacheprovider -m gpu -n 4 -rs --timeout 240 tests > $OUT/gpu_tests.txt 2>&1
el "gpu tests rc=$?"; grep -E "passed|failed" $OUT/gpu_tests.txt | tail -2; grep -E "^FAILED|^ERROR" $OUT/gpu_tests.txt | head -20
bash scripts/gpu/det_tasks.sh

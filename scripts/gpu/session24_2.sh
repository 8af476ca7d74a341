# Session 24, nvidia-h200-x2, after the session's merges (image reading, marching-cubes edge margin, data and training
# checks, SIGTERM): every `gpu`-marked test (on the first GPU), then every training task deterministic and
# resume-exact on 2 ranks with FSDP2 instead of DDP (PARALLEL=fsdp NPROC=2 scripts/gpu/det_tasks.sh). The demo
# pipeline's weights stay behind (tree size): the tests that need them skip. Carried: .gpu/whl.
source scripts/gpu/_prelude.sh
timeout 280 python3 -m pytest -q -p no:cacheprovider -m gpu -n 4 -rs --timeout 240 tests > $OUT/gpu_tests.txt 2>&1
el "gpu tests rc=$?"; grep -E "passed|failed" $OUT/gpu_tests.txt | tail -2; grep -E "^FAILED|^ERROR" $OUT/gpu_tests.txt | head -20
OUT=$OUT/det PARALLEL=fsdp NPROC=2 bash scripts/gpu/det_tasks.sh

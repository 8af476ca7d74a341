# Session 27, call 3 (nvidia-h200-x2), after the session's merges (config merge_args, signal watchdog, app):
# every training task deterministic and resume-exact with two ranks over NCCL, then the GPU test suite.
source scripts/gpu/_prelude.sh
NPROC=2 OUT=$OUT/det bash scripts/gpu/det_tasks.sh 2>&1 | tail -25
el "det_tasks done"
timeout 330 python3 -m pytest -q -p no:cacheprovider -m gpu -n 4 -rs tests 2>&1 | tail -25
el done

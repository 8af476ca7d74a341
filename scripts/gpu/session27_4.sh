# Session 27, call 4 (nvidia-h200-x2), after the validation / checkpoint-gather watchdog (val27) and the one-process
# rule: the stop watchdog over NCCL (stop27.py: a death in a step and in validation), then every training task
# deterministic and resume-exact on two ranks with DDP and with FSDP2.
source scripts/gpu/_prelude.sh
python3 scripts/gpu/stop27.py --out $OUT 2>&1 | grep "^{" 
el "stop27 done"
NPROC=2 OUT=$OUT/ddp bash scripts/gpu/det_tasks.sh 2>&1 | grep -E "^(PASS|FAIL|[0-9]/)|tasks|rc="
PARALLEL=fsdp NPROC=2 OUT=$OUT/fsdp bash scripts/gpu/det_tasks.sh 2>&1 | grep -E "^(PASS|FAIL|[0-9]/)|tasks|rc="
el done

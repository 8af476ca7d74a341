# Session 28 (nvidia-h200-x2): the checkpoint writer's barrier after its peer died, over NCCL (stop27.py --cases
# checkpoint: rank 1 dead at the barrier while rank 0 writes step 3's checkpoint for 2 s), at train.stop_grace_s
# 1 / 10 s and 1000 s (no watchdog in effect: torchrun's SIGKILL).
source scripts/gpu/_prelude.sh
python3 scripts/gpu/stop27.py --cases checkpoint --out $OUT 2>&1 | grep "^{"
el done

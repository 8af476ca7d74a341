# Session 27, call 2 (nvidia-h200-x2): train.stop_grace_s with a rank stuck in an NCCL all-reduce (stop27.py).
source scripts/gpu/_prelude.sh
python3 scripts/gpu/stop27.py --out $OUT 2>&1 | tail -60
el done

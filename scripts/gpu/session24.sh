# Session 24, nvidia-h200-x2: DDP's all-reduce against train.deterministic's rank-order hook (scripts/gpu/ddp_reduce.py:
# time per forward/backward of a 268 M-parameter linear stack, bit-identity over bucket layouts, difference of the
# means), then every training task deterministic and resume-exact on 2 ranks under torchrun with the hook on NCCL
# (NPROC=2 scripts/gpu/det_tasks.sh). The demo pipeline's weights stay behind (tree size). Carried: .gpu/whl.
source scripts/gpu/_prelude.sh
timeout 200 torchrun --standalone --nproc_per_node 2 scripts/gpu/ddp_reduce.py --out $OUT/ddp_reduce.json \
  > $OUT/ddp_reduce.txt 2>&1
el "ddp_reduce rc=$?"; grep -v Warning $OUT/ddp_reduce.txt | tail -30
OUT=$OUT/det NPROC=2 bash scripts/gpu/det_tasks.sh

# Issue 4, session 14, call 5: a training step of the v1.1 1024³ sparse DiT (4 blocks, published width) on the
# 134k-token layout after the block-mean fix: step time and GPU time per kernel, at 134k and 33k tokens.
source scripts/gpu/_prelude.sh
python3 scripts/gpu/dit_step_profile.py --layouts $L 2>&1 | grep -v Warn | grep -v _warn_once | cut -c1-160
el n134k
python3 scripts/gpu/dit_step_profile.py --layouts $L --size 32768 --rows 12 2>&1 | grep -v Warn | grep -v _warn_once | cut -c1-160
el n33k

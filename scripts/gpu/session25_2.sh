# Issue 4, session 25, calls 4-5: the compressed forward that also writes bounded top-k scores (scripts/gpu/bounded25.py):
# its time with the head sums (tl.sum or a 0/1 matmul) and stores against the main forward, its P / l(t) against torch,
# candidate counts.
source scripts/gpu/_prelude.sh
python3 scripts/gpu/bounded25.py --layouts $L --out $OUT 2>&1 | tail -40
el done

# Issue 4, session 12, call 2: the softmax forwards' probability cast to bfloat16, F2FP ("cvt") against integer add
# + byte permute ("alu"): A/B timings of the compressed, selection and window forwards (scripts/gpu/ssa_cast.py).
source scripts/gpu/_prelude.sh
python3 scripts/gpu/ssa_cast.py --layouts $L 2>&1 | grep -v Warn | tee $OUT/cast.md
el cast

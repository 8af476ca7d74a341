# Issue 4, session 25, calls 6-8: the bounded top-k scores of one exp pass as hand-written CUDA (NVRTC): checked against
# torch and timed beside the CUDA LSE probe of the same shape and the Triton kernels; call 8 adds P·V (the whole
# compressed forward plus the scores).
source scripts/gpu/_prelude.sh
python3 scripts/gpu/nvrtc25_scores.py --layouts $L --out $OUT 2>&1 | tail -40
el done

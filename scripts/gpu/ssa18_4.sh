# Issue 4, session 18, call 4: the window forward with the selection's fixed shift from its first chunk, that chunk
# the window's masked remainder (shift "first", masked_chunk "first"), with and without per-lane row sums, against
# its online softmax; the top-k capped at 72 registers (7 CTAs per SM, 88 bytes of spill) against 80. A/B
# interleaved at N = 134k.
source scripts/gpu/_prelude.sh
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --kernels win,topk --variants '{"base": {},
  "first": {"win": {"shift": "first", "masked_chunk": "first"}},
  "first_lanes": {"win": {"shift": "first", "masked_chunk": "first", "rowsum": "lanes"}},
  "cap72": {"topk": {"maxnreg": 72}}}' 2>&1 | grep -v Warn | tee $OUT/v11.txt
el v11

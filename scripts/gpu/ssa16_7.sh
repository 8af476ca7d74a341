# Issue 4, session 16, call 7: v1.0's top-k at the paper's 512³ setting (top-k 32) and at 32k tokens: main 04a7e34's
# kernel file (.gpu/old) against this tree's defaults (4 row chunks, cap 128, 3 stages) and without the cap.
source scripts/gpu/_prelude.sh
cp .gpu/old/triton_compress.py src/d3s2/ops/ssa/_old_compress.py
for size in 32768 131072; do
  python3 scripts/gpu/topk_old_new.py --layouts $L --m-cmp 4 --topk 32 --size $size --rounds 2 \
      --variants '{"new": {}, "nocap": {"maxnreg": null}}' 2>&1 | grep -v Warn | tee -a $OUT/topk32.txt
  el "size $size"
done

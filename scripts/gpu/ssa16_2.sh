# Issue 4, session 16, call 2: v1.0's top-k (m_cmp 4 < m_slc 8: compression blocks summed into selection blocks by a
# one-hot matmul). The segment sum in float16 against an exact 0/1 matrix (one wgmma; was tf32x3: three, with the
# float32 one-hot held twice in registers; ptxas sm_90 232 → 183 registers at 2 row chunks, 161 at 4) and int32
# keys sized by selection blocks (they were sized by compression blocks: int64 keys for v1.0 samples over 4,096
# compression blocks). GPU tests of tests/ops/ssa, then main's kernel file (carried as .gpu/old) against this tree's
# under launch options, interleaved in one process, v1.0 and v1.1 layouts at N = 134k.
source scripts/gpu/_prelude.sh
cp .gpu/old/triton_compress.py src/d3s2/ops/ssa/_old_compress.py
python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/ops/ssa > $OUT/tests.txt 2>&1
tail -3 $OUT/tests.txt
el tests
python3 scripts/gpu/topk_old_new.py --layouts $L --m-cmp 4 --variants '{"new": {}, "ms4": {"m_split": 4},
  "ms4r128": {"m_split": 4, "maxnreg": 128}, "ms4r112": {"m_split": 4, "maxnreg": 112},
  "ms4r96": {"m_split": 4, "maxnreg": 96}, "ms4r128l4": {"m_split": 4, "maxnreg": 128, "lists": 4},
  "ms4r128s3": {"m_split": 4, "maxnreg": 128, "num_stages": 3}}' 2>&1 | grep -v Warn | tee $OUT/v10.txt
el v10
python3 scripts/gpu/topk_old_new.py --layouts $L --m-cmp 8 --variants '{"new": {}}' 2>&1 | grep -v Warn \
    | tee $OUT/v11.txt
el v11

# Issue 4, session 15, call 2: the attention epilogues with one reciprocal per row (no div.full fix-ups per element)
# and the LSE's log2 by lg2.approx (FAST_LOG2). GPU tests, then bench_ssa.py v1.1 at N = 134k with fed29f4's three
# kernel files (.gpu/old, carried) and the new ones, alternated twice in the same call; the selection's per-kernel
# profile for both.
source scripts/gpu/_prelude.sh
python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/ops/ssa tests/ops/block_attn tests/flow/test_cuda_graph.py \
    tests/models/attention > $OUT/tests.txt 2>&1
tail -3 $OUT/tests.txt
el tests
B="python3 benchmarks/bench_ssa.py --layouts $L --sizes 131072 --configs v1.1 --no-batch --no-shifted --no-module"
rm -rf /tmp/oldsrc && cp -r src /tmp/oldsrc
cp .gpu/old/triton.py /tmp/oldsrc/d3s2/ops/block_attn/triton.py
cp .gpu/old/triton_compress.py /tmp/oldsrc/d3s2/ops/ssa/triton_compress.py
cp .gpu/old/_exp2.py /tmp/oldsrc/d3s2/ops/_exp2.py
for r in 1 2; do
  mkdir -p $OUT/old$r $OUT/new$r
  PYTHONPATH=/tmp/site:/tmp/oldsrc $B --out $OUT/old$r --commit "fed29f4" 2>&1 | grep '^| v1.1' | cut -c1-400
  el old$r
  $B --out $OUT/new$r --commit "${COMMIT}" 2>&1 | grep '^| v1.1' | cut -c1-400
  el new$r
done
PYTHONPATH=/tmp/site:/tmp/oldsrc python3 scripts/gpu/ssa_kernel_profile.py --layouts $L --rows 8 2>&1 | grep '^|\|^#' \
    | cut -c1-160 > $OUT/profile_old.md
python3 scripts/gpu/ssa_kernel_profile.py --layouts $L --rows 8 2>&1 | grep '^|\|^#' | cut -c1-160 > $OUT/profile_new.md
head -12 $OUT/profile_old.md; head -12 $OUT/profile_new.md
el profile

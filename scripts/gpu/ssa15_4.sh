# Issue 4, session 15, call 4: the selection plan and tile tables in fewer launches (list ends from where the sorted
# keys change + one program for starts and counts, instead of a cast, an arange and a binary search per list; tile
# tables by one scan program and one binary-search kernel instead of seven torch ops; the partials' |v| check inside
# the key-norm pass). GPU tests, then bench_ssa.py v1.1 at N = 8k and 134k with 5e246fa's block-attention file and
# bench (.gpu/old, carried) and the new ones, alternated twice; the selection forward's kernels after.
source scripts/gpu/_prelude.sh
python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/ops/ssa tests/ops/block_attn tests/flow/test_cuda_graph.py \
    tests/models/attention > $OUT/tests.txt 2>&1
tail -2 $OUT/tests.txt
el tests
rm -rf /tmp/oldsrc /tmp/oldbench && cp -r src /tmp/oldsrc && cp -r benchmarks /tmp/oldbench
cp .gpu/old/triton.py /tmp/oldsrc/d3s2/ops/block_attn/triton.py
cp .gpu/old/bench_ssa.py /tmp/oldbench/bench_ssa.py
A="--layouts $L --sizes 8192,131072 --configs v1.1 --no-batch --no-shifted --no-module"
for r in 1 2; do
  mkdir -p $OUT/old$r $OUT/new$r
  PYTHONPATH=/tmp/site:/tmp/oldsrc python3 /tmp/oldbench/bench_ssa.py $A --out $OUT/old$r --commit 5e246fa 2>&1 \
      | grep '^| v1.1' | cut -c1-400
  el old$r
  python3 benchmarks/bench_ssa.py $A --out $OUT/new$r --commit "${COMMIT}" 2>&1 | grep '^| v1.1' | cut -c1-400
  el new$r
done
python3 scripts/gpu/ssa_kernel_profile.py --layouts $L --rows 40 2>&1 | grep '^|\|^#' | cut -c1-170 > $OUT/profile.md
head -30 $OUT/profile.md
el profile

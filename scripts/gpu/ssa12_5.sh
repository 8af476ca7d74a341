# Issue 4, session 12, call 5: the selection plan in fewer launches (entry keys in one Triton kernel, int32 bounds
# and tile tables without casts); block-attention / SSA GPU tests, then whole-call times of the previous
# block-attention file (.gpu/old/triton.py = e08c2dc's, carried) and this tree, alternating, and the kernel profile.
source scripts/gpu/_prelude.sh
python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/ops/ssa tests/ops/block_attn tests/flow/test_cuda_graph.py \
    tests/models/attention/test_ssa.py > $OUT/tests.txt 2>&1
tail -3 $OUT/tests.txt
el tests
rm -rf /tmp/oldsrc && cp -r src /tmp/oldsrc && cp .gpu/old/triton.py /tmp/oldsrc/d3s2/ops/block_attn/triton.py
for r in 1 2 3; do
  PYTHONPATH=/tmp/site:/tmp/oldsrc python3 scripts/gpu/slc_call_ms.py --layouts $L --tag old 2>&1 | grep '^{' | tee -a $OUT/calls.jsonl
  python3 scripts/gpu/slc_call_ms.py --layouts $L --tag new 2>&1 | grep '^{' | tee -a $OUT/calls.jsonl
done
el calls
python3 scripts/gpu/ssa_kernel_profile.py --layouts $L --rows 16 > $OUT/profile.md 2>&1
grep -v Warn $OUT/profile.md | head -24 | cut -c1-140
el profile

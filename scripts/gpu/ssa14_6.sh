# Issue 4, session 14, call 6: the selection dK/dV with long lists cut into chunks (DKDV_SPLIT). GPU tests (SSA,
# block attention, graphs, layer), the selection backward on balanced lists with and without the split, and a
# training step of the 1024³ sparse DiT (4 blocks, 134k tokens: skewed lists at initialisation) with and without.
source scripts/gpu/_prelude.sh
python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/ops/ssa tests/ops/block_attn tests/flow/test_cuda_graph.py \
    tests/models/attention > $OUT/tests.txt 2>&1
tail -3 $OUT/tests.txt
el tests
python3 scripts/gpu/slc_bwd_ms.py --layouts $L 2>&1 | grep '^{' | tee $OUT/slc_bwd.jsonl
el slc_bwd
for r in 1 2; do
  python3 scripts/gpu/dit_step_profile.py --layouts $L --no-split --no-profile 2>&1 | grep '^{' | tee -a $OUT/dit.jsonl
  python3 scripts/gpu/dit_step_profile.py --layouts $L --no-profile 2>&1 | grep '^{' | tee -a $OUT/dit.jsonl
done
el dit
python3 scripts/gpu/dit_step_profile.py --layouts $L --rows 12 2>&1 | grep -v Warn | grep -v _warn_once | cut -c1-160
el profile

# Issue 4, session 16, call 1: the top-k kernel's key tiles load synchronously (LDG → STS → barrier before every
# tile's first wgmma: the insertion loop nested in the tile loop keeps Triton's pipeliner out; SASS compiled for
# sm_90 here). Options on branch aug16: "prefetch" (the next tile's keys loaded while this one is scored) and
# "lse_aug" (the LSE split stacked under qᵀ against keys augmented with ones: one wgmma chain per row chunk instead of
# two with a wait between). GPU tests of both, then A/B of the top-k alone, interleaved in one process.
source scripts/gpu/_prelude.sh
python3 -m pytest -q -p no:cacheprovider -n 4 --timeout 300 tests/ops/ssa/test_ssa_gpu.py -k topk_options \
    > $OUT/tests.txt 2>&1
tail -3 $OUT/tests.txt
el tests
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --kernels topk --variants '{"base": {},
  "pf": {"topk": {"prefetch": true}}, "pf104": {"topk": {"prefetch": true, "maxnreg": 104}},
  "aug": {"topk": {"lse_aug": true}}, "augpf": {"topk": {"lse_aug": true, "prefetch": true}},
  "augpf128": {"topk": {"lse_aug": true, "prefetch": true, "maxnreg": 128}}}' 2>&1 | grep -v Warn | tee $OUT/ab.txt
el ab

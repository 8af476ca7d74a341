# Issue 4, session 12, call 3: the compressed forward's register cap. ptxas (sm_90) serialises its wgmmas below 92
# registers (C7512 "insufficient register resources"; 80 is the default: 6 CTAs per SM); 92-96 keep them async
# (5 CTAs). A/B in one process (scripts/gpu/ssa_ab.py).
source scripts/gpu/_prelude.sh
python3 scripts/gpu/ssa_ab.py --layouts $L --kernels cmp --rounds 3 --variants '{"cap80": {}, "cap88": {"cmp": {"maxnreg": 88}}, "cap92": {"cmp": {"maxnreg": 92}}, "cap96": {"cmp": {"maxnreg": 96}}, "cap92_3stages": {"cmp": {"maxnreg": 92, "num_stages": 3}}, "nocap": {"cmp": {"maxnreg": null}}}' 2>&1 | grep -v Warn | tee $OUT/cmp_cap.md
el cmp cap

# Issue 4, session 20, call 1: every SSA kernel with mma.sync (Triton's DISABLE_MMA_V3) instead of wgmma. With
# mma.sync ptxas interleaves a tile's exps with the next n-tile's matmuls (scoreboards, no warpgroup wait), the
# overlap that Triton's wgmma code does not get. The lean exp-pass probe (scripts/gpu/exp_pass_probe.py) and the
# kernels, A/B interleaved at N = 134k (v1.1; v1.0's compressed forward and segment top-k).
source scripts/gpu/_prelude.sh
python3 scripts/gpu/exp_pass_probe.py --layouts $L 2>&1 | grep -v Warn | tee $OUT/probe.txt
el probe
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --kernels cmp,topk,slc,win,cmp_bwd,slc_bwd,win_bwd --variants '{"base": {},
  "m2": {"mma2": true},
  "m2r96": {"mma2": true, "cmp": {"maxnreg": 96}, "topk": {"maxnreg": 96}, "slc": {"maxnreg": 112}, "win": {"maxnreg": 80}},
  "m2free": {"mma2": true, "cmp": {"maxnreg": 0}, "topk": {"maxnreg": 0}, "slc": {"maxnreg": 0}, "win": {"maxnreg": 0}}}' 2>&1 | grep -v Warn | tee $OUT/ab.txt
el ab
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --m-cmp 4 --kernels cmp,topk --variants '{"base": {},
  "m2": {"mma2": true}, "m2free": {"mma2": true, "cmp": {"maxnreg": 0}, "topk_seg": {"maxnreg": 0}}}' 2>&1 | grep -v Warn | tee $OUT/ab_v10.txt
el ab_v10

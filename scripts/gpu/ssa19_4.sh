# Issue 4, session 19, call 4: main with the compressed and window forwards on 128-row tiles of two warpgroups; the
# window around its new point (72-register cap, 2 / 4 stages) and both against session 18's configs (A/B interleaved
# at N = 134k); then the GPU tests and the benchmarks (scripts/gpu/ssa15_7.sh).
source scripts/gpu/_prelude.sh
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --kernels cmp,win --variants '{"base": {},
  "s18": {"cmp": {"rows": 64, "num_warps": 4, "num_stages": 2}, "win": {"BLOCK_M": 64, "num_warps": 4, "maxnreg": null}},
  "win_r72": {"win": {"maxnreg": 72}},
  "win_s2": {"win": {"num_stages": 2}},
  "win_s4": {"win": {"num_stages": 4}}}' 2>&1 | grep -v Warn | tee $OUT/ab.txt
el ab
bash scripts/gpu/ssa15_7.sh

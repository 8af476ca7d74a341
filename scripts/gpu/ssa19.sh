# Issue 4, session 19, call 1: the top-k inserting each key tile's candidates one tile later (deferred_insert: the
# integer rounds can fill the next tile's matmul and exp latency), at 80 and 88 registers; FMA-pipe exps (mix4) in
# both compressed passes; the compressed forward on 128-row tiles of two warpgroups; and the leanest exp pass
# Triton compiles over the same logits (scripts/gpu/exp_pass_probe.py). A/B interleaved at N = 134k. The
# deferred_insert option is on branch defer19 only (slower: not merged); on main those variants run the default.
source scripts/gpu/_prelude.sh
python3 scripts/gpu/ssa_ab.py --layouts $L --rounds 3 --kernels cmp,topk --variants '{"base": {},
  "defer80": {"topk": {"deferred_insert": true}},
  "defer88": {"topk": {"deferred_insert": true, "maxnreg": 88}},
  "mix4": {"topk": {"exp2": "mix4"}, "cmp": {"exp2": "mix4"}},
  "w8": {"cmp": {"rows": 128, "num_warps": 8}},
  "w8s3": {"cmp": {"rows": 128, "num_warps": 8, "num_stages": 3}}}' 2>&1 | grep -v Warn | tee $OUT/ab.txt
el ab
python3 scripts/gpu/exp_pass_probe.py --layouts $L 2>&1 | grep -v Warn | tee $OUT/probe.txt
el probe

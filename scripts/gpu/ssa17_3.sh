# Issue 4, session 17, call 3: the tree with the top-k's in-register head sum as the default (calls 1-2), run
# through session 15's final script (GPU tests, bench_ssa.py v1.1 at 134k alone, the selection's kernels, the
# complete benchmark): COMMIT=<sha> bash scripts/gpu/ssa17_3.sh
exec bash scripts/gpu/ssa15_7.sh

# Issue 4, session 17, call 4: ssa15_7.sh's benchmark part alone on the new default (call 3 ran out of its 600 s in
# the GPU tests): bench_ssa.py v1.1 at 134k alone (the README's table), the selection's kernels (profile), the
# complete benchmark. COMMIT=<sha> bash scripts/gpu/ssa17_4.sh (the call ran these steps as a copy of ssa15_7.sh's)
SKIP_TESTS=1 exec bash scripts/gpu/ssa15_7.sh

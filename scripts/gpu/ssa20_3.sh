# Issue 4, session 20, call 3: the SSA benchmarks of main on an H100 (the targets name H100/H200; every earlier
# run was on an H200): v1.1 at N = 134k alone, the selection's kernels (profile), the complete benchmark.
SKIP_TESTS=1 bash scripts/gpu/ssa15_7.sh

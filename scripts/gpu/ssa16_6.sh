# Issue 4, session 16, call 6: the tree with the v1.0 top-k, compressed dK/dV and block-attention dQ configs of
# calls 2-5, run through session 15's final script (GPU tests, bench_ssa.py v1.1 at 134k alone, the selection's
# kernels, the complete benchmark): COMMIT=cc20419 bash scripts/gpu/ssa16_6.sh
exec bash scripts/gpu/ssa15_7.sh

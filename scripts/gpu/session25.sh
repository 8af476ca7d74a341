# Issue 4, session 25: the compressed branch's two exp passes as hand-written CUDA compiled at run time by NVRTC
# (mma.sync, which ptxas interleaves with the exps), checked against and timed beside the Triton kernels
# (v1.1, N = 134k). CUBINs built on the CPU box (.gpu/cub25) are the fallback if this machine has no NVRTC.
source scripts/gpu/_prelude.sh
python3 -c "import torch; print(torch.__version__, torch.version.cuda)"
if python3 scripts/gpu/nvrtc25.py --layouts $L --out $OUT 2>&1 | tee $OUT/nvrtc25.log | tail -60; then :; fi
if ! grep -q "^| triton topk" $OUT/nvrtc25.log; then
  el "NVRTC run failed: carried CUBINs"
  python3 scripts/gpu/nvrtc25.py --layouts $L --cubins .gpu/cub25 --out $OUT 2>&1 | tail -60
fi
el done

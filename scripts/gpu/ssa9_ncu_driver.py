"""One v1.1 SSA forward at N = 131072 (bf16, Hq 32 / Hkv 2 / D 32) between cudaProfilerStart/Stop, for ncu.

Usage (device): ncu --profile-from-start off ... python3 scripts/gpu/ssa9_ncu_driver.py LAYOUTS.npz
The first forward (outside the profiled range) compiles every kernel.
"""

import sys

import numpy as np
import torch

from d3s2.ops.ssa import build_ssa_layout, spatial_sparse_attention
from d3s2.sparse import SparseTensor

coords = torch.from_numpy(np.load(sys.argv[1])["131072"].astype(np.int32))
x = SparseTensor.from_samples([coords], [torch.zeros(len(coords), 1)], resolution=128).to("cuda")
layout = build_ssa_layout(x, m_cmp=8, m_slc=8, m_win=8, shift=0)
gen = torch.Generator(device="cuda").manual_seed(0)
n, nc = layout.num_tokens, layout.num_cmp


def r(*shape):
    return torch.randn(*shape, device="cuda", generator=gen).to(torch.bfloat16)


ins = [r(n, 32, 32), r(n, 2, 32), r(n, 2, 32), r(nc, 2, 32), r(nc, 2, 32),
       torch.rand(n, 3, device="cuda", generator=gen).to(torch.bfloat16)]
with torch.no_grad():
    spatial_sparse_attention(*ins, layout, topk=8, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    spatial_sparse_attention(*ins, layout, topk=8, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
print("tokens", n, "compressed blocks", nc)

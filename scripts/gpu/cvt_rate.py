"""Throughput of the exponential and of the float32 → bfloat16 conversion on the device: does ``F2FP`` (the packed
conversion of two floats) share the slow pipe of ``MUFU.EX2``? One Triton loop per mode over registers (8 values per
thread, 16 warps per SM of independent work), timed by do_bench; prints one JSON line per mode with the PTX
instruction counts of its loop and the rate in values per clock per SM at the clock read from nvidia-smi.

Modes: ``ex2`` (exp2 + add), ``ex2+cvt`` (+ the conversion and back), ``ex2+alu`` (+ the integer rounding of
``to_bf16_alu`` and back), ``cvt`` and ``alu`` alone, ``ex2.f16`` (the half-precision exponential
``ex2.approx.f16x2``, which ptxas splits into two ``MUFU.EX2.F16``: is that op faster than the float32 one?). Usage (device): ``python3 scripts/gpu/cvt_rate.py``
"""

import json
import re
import subprocess

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

MODES = ("ex2", "ex2+cvt", "ex2+alu", "cvt", "alu", "ex2.f16")


@triton.jit
def to_bf16_alu(x):
    """float32 → bfloat16 rounded to nearest (ties away from zero) by an integer add and a truncation (the option
    ``p_cast: "alu"`` of branch cast15, measured slower in every SSA kernel: session 15)."""
    return ((x.to(tl.int32, bitcast=True) + 0x8000) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _rate_kernel(X, OUT, ITERS: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(ITERS):
        if MODE == "ex2":
            y = tl.exp2(x)
        elif MODE == "ex2+cvt":
            y = tl.exp2(x).to(tl.bfloat16).to(tl.float32)
        elif MODE == "ex2+alu":
            y = to_bf16_alu(tl.exp2(x)).to(tl.float32)
        elif MODE == "ex2.f16":
            y = tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)], dtype=tl.float16,
                                          is_pure=True, pack=2).to(tl.float32)
        elif MODE == "cvt":
            y = x.to(tl.bfloat16).to(tl.float32)
        else:
            y = to_bf16_alu(x).to(tl.float32)
        acc += y
        x = x - 0.001
    tl.store(OUT + offs, acc)


def main() -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    block, iters = 1024, 4096
    programs = sms * 4 * 8  # 4 warps each: 32 warps per SM over the run
    x = -torch.rand(programs * block, device="cuda")
    out = torch.empty_like(x)
    values = programs * block * iters
    for mode in MODES:
        k = _rate_kernel[(programs,)](x, out, ITERS=iters, MODE=mode, BLOCK=block, num_warps=4)
        ptx = k.asm["ptx"]
        counts = {op: len(re.findall(re.escape(op), ptx)) for op in ("ex2.approx", "cvt.rn.bf16x2.f32", "prmt.b32",
                                                                    "cvt.rn.bf16.f32", "cvt.rn.f16x2.f32")}
        ms = do_bench(lambda m=mode: _rate_kernel[(programs,)](x, out, ITERS=iters, MODE=m, BLOCK=block,
                                                              num_warps=4), rep=200, return_mode="median")
        clock = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True).stdout.strip()
        per_clk = values / (ms * 1e-3) / sms / (float(clock) * 1e6) if clock else None
        print(json.dumps({"mode": mode, "ms": ms, "values_per_ns": values / ms / 1e6, "sm_clock_mhz": clock,
                          "values_per_clk_per_sm": per_clk, "ptx_counts": counts}), flush=True)


if __name__ == "__main__":
    main()

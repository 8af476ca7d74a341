"""exp2 variants for the attention kernels' softmax, chosen per kernel by a constexpr ``MODE``, and the fast log2 of
their epilogues.

At head dim 32 attention is bounded by exponentials, not by matmuls: the MUFU unit evaluates 16 ex2 per clock per
SM against 128 FP32 FMAs, so evaluating part of the exps as a polynomial on the FMA pipe (8 instructions each on
sm_90: max, 3 adds, 3 FMAs, one LEA) raises the ceiling (the FlashAttention-4 trick). Half precision does not:
``ex2.approx.f16x2`` compiles to two ``MUFU.EX2.F16`` on sm_90. That only pays in a kernel whose MUFU is the
bottleneck: on an H200 SSA's compressed forward, score pass and selection forward all ran slower with any share of
their exps on the polynomial (latency- and occupancy-bound; ``benchmarks/results/ssa_NVIDIA_H200.md``, session 4),
so every default is ``"mufu"``. Modes:

- ``"mufu"``: ``tl.exp2`` (``ex2.approx.ftz.f32``, one MUFU op).
- ``"poly"``: every exp on the FMA pipe: 2^x = 2^j · p(x − j), j = round(x) by the 1.5·2²³ magic add, p a
  degree-3 minimax polynomial on [−½, ½] (relative error ≤ 7.5e-5, about a third of a float16 ulp), and j
  added into the exponent bits with integer ops. Written in Triton ops, so it also runs in the interpreter.
- ``"mix"``: inline PTX on element pairs: one ``ex2.approx.ftz.f32`` and one polynomial (half the MUFU load).
- ``"mix4"``: inline PTX on groups of four: three ``ex2.approx.ftz.f32``, one polynomial (for kernels whose FMA
  pipe is already busy).
  Inline asm does not run under ``TRITON_INTERPRET=1``: :func:`resolve_mode` maps both to ``"poly"`` there.

Inputs must be ≤ 127 (attention exponents are ≤ 0); below −125 the polynomial clamps to 2^−125·p (≈ 1e-38
instead of 0: negligible next to any probability ≥ 2^−125 of the same row, and masked columns carry zero
values). :func:`exp2_poly_ref` is the same formula in torch (the CPU tests' spec).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

MODES = ("mufu", "poly", "mix", "mix4")
ASM_MODES = ("mix", "mix4")
# p(f) ≈ 2^f on [-1/2, 1/2] (relative-error minimax fit, float32 coefficients; bits in the PTX below)
C0, C1, C2, C3 = 0.9999280571937561, 0.6932609677314758, 0.2426111400127411, 0.0551716685295105
MAGIC = 12582912.0  # 1.5 * 2**23: x + MAGIC rounds x to an integer held in the low mantissa bits
X_MIN = -125.0  # keeps 2^j · p a normal float32


def resolve_mode(mode: str, device: torch.device) -> str:
    """The mode a launch on ``device`` runs: inline-asm modes become ``"poly"`` under the interpreter."""
    if mode not in MODES:
        raise ValueError(f"expected an exp2 mode in {MODES}, got {mode!r}")
    if mode in ASM_MODES and (device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        return "poly"
    return mode


def exp2_poly_ref(x: torch.Tensor) -> torch.Tensor:
    """float32 reference of the ``"poly"`` formula (same operations and roundings, FMAs as mul + add)."""
    x = x.float().clamp_min(X_MIN)
    t = x + MAGIC
    f = x - (t - MAGIC)
    p = ((C3 * f + C2) * f + C1) * f + C0
    bits = p.view(torch.int32) + (t.view(torch.int32) << 23)
    return bits.view(torch.float32)


@triton.jit
def exp2_poly(x):
    """2^x on the FMA pipe (see the module docstring); float32 in, float32 out."""
    x = tl.maximum(x, -125.0)
    t = x + 12582912.0
    f = x - (t - 12582912.0)
    p = ((0.0551716685295105 * f + 0.2426111400127411) * f + 0.6932609677314758) * f + 0.9999280571937561
    return (p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)).to(tl.float32, bitcast=True)


# 2^x of input operand IN into output operand OUT by the polynomial (PTX; the float32 bits of the constants above)
_POLY_PTX = """
        max.f32 x, IN, 0fC2FA0000;
        add.rn.f32 t, x, 0f4B400000;
        sub.rn.f32 j, t, 0f4B400000;
        sub.rn.f32 f, x, j;
        fma.rn.f32 p, f, 0f3D61FBB0, 0f3E786F0E;
        fma.rn.f32 p, p, f, 0f3F31798D;
        fma.rn.f32 p, p, f, 0f3F7FFB49;
        shl.b32 e, t, 23;
        add.s32 OUT, p, e;"""
# every register .b32 so that float and integer instructions may share them (constexpr: read inside @jit)
_MIX2_ASM = tl.constexpr("{ .reg .b32 x, t, j, f, p, e;\n ex2.approx.ftz.f32 $0, $2;"
                         + _POLY_PTX.replace("IN", "$3").replace("OUT", "$1") + "\n}")
_MIX4_ASM = tl.constexpr("{ .reg .b32 x, t, j, f, p, e;\n ex2.approx.ftz.f32 $0, $4;\n ex2.approx.ftz.f32 $1, $5;\n"
                         " ex2.approx.ftz.f32 $2, $6;" + _POLY_PTX.replace("IN", "$7").replace("OUT", "$3") + "\n}")


@triton.jit
def _exp2_mix(x):
    # pairs (a, b): a by MUFU, b by the polynomial
    return tl.inline_asm_elementwise(_MIX2_ASM, "=r,=r,r,r", [x], dtype=tl.float32, is_pure=True, pack=2)


@triton.jit
def _exp2_mix4(x):
    # groups of four: three by MUFU, one by the polynomial
    return tl.inline_asm_elementwise(_MIX4_ASM, "=r,=r,=r,=r,r,r,r,r", [x], dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def exp2(x, MODE: tl.constexpr):
    """2^x of a float32 tile by ``MODE`` (one of ``MODES``; see :func:`resolve_mode`)."""
    if MODE == "poly":
        return exp2_poly(x)
    elif MODE == "mix":
        return _exp2_mix(x)
    elif MODE == "mix4":
        return _exp2_mix4(x)
    else:
        return tl.exp2(x)


def fast_math(device: torch.device) -> bool:
    """Whether a launch on ``device`` may use the MUFU approximations of :func:`log2` (compiled CUDA only: the CPU
    interpreter has no libdevice)."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"


@triton.jit
def log2(x, FAST: tl.constexpr):
    """log2 of a positive float32 tile. FAST: ``lg2.approx`` (one MUFU op, ≈ 2⁻²² relative error; libdevice
    ``fast_log2f``) instead of the precise ``log2f`` (a ≈ 30-instruction polynomial per value), which the interpreter
    runs. For the attention epilogues' LSE: a row's log-sum-exp error then stays at float32 rounding."""
    if FAST:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)

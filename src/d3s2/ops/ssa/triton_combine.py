"""Triton gate combine of the SSA branches, ``o = g0·o_cmp + g1·o_slc + g2·o_win``, forward and backward.

Same contract as :func:`d3s2.ops.ssa.reference.combine_ref` (gates ``[N, 3]`` rounded to the branches' dtype,
broadcast over heads and D), computed in float32 with one rounding at the end. The torch expression takes
five elementwise passes forward and about nine backward over ``[N, Hq, D]`` tensors; these kernels read each
branch output once: forward 3 reads + 1 write, backward 4 reads + 3 writes, the gate gradients (row sums of
``dO·o_branch``) accumulated in float32 on the way, in a fixed order (deterministic).

Dimension legend: N tokens, F = Hq·D features per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tokens × features per program; the backward loops over F in BLOCK_F chunks so that each program owns whole
# rows (the gate gradient is a row sum).
CONFIG = {"fwd": {"BLOCK_N": 32, "BLOCK_F": 256, "num_warps": 4},
          "bwd": {"BLOCK_N": 16, "BLOCK_F": 256, "num_warps": 4}}


@triton.jit
def _gate_combine_fwd_kernel(GATES, A, B, C, O, N, F,
                             BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    n_ok = n < N
    # gates rounded to the branches' dtype first, as the reference does
    g0 = tl.load(GATES + n * 3, mask=n_ok, other=0.0).to(O.dtype.element_ty).to(tl.float32)
    g1 = tl.load(GATES + n * 3 + 1, mask=n_ok, other=0.0).to(O.dtype.element_ty).to(tl.float32)
    g2 = tl.load(GATES + n * 3 + 2, mask=n_ok, other=0.0).to(O.dtype.element_ty).to(tl.float32)
    ptrs = n.to(tl.int64)[:, None] * F + f[None, :]
    mask = n_ok[:, None] & (f < F)[None, :]
    a = tl.load(A + ptrs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + ptrs, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(C + ptrs, mask=mask, other=0.0).to(tl.float32)
    o = g0[:, None] * a + g1[:, None] * b + g2[:, None] * c
    tl.store(O + ptrs, o.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _gate_combine_bwd_kernel(GATES, A, B, C, DO, DA, DB, DC, DG, N, F,
                             BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    """dA = g0·dO (etc.) and DG [N, 3] float32 = row sums of dO·A, dO·B, dO·C."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    g0 = tl.load(GATES + n * 3, mask=n_ok, other=0.0).to(DO.dtype.element_ty).to(tl.float32)
    g1 = tl.load(GATES + n * 3 + 1, mask=n_ok, other=0.0).to(DO.dtype.element_ty).to(tl.float32)
    g2 = tl.load(GATES + n * 3 + 2, mask=n_ok, other=0.0).to(DO.dtype.element_ty).to(tl.float32)
    s0 = tl.zeros([BLOCK_N], tl.float32)
    s1 = tl.zeros([BLOCK_N], tl.float32)
    s2 = tl.zeros([BLOCK_N], tl.float32)
    row = n.to(tl.int64)[:, None] * F
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        ptrs = row + f[None, :]
        mask = n_ok[:, None] & (f < F)[None, :]
        do = tl.load(DO + ptrs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(A + ptrs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(B + ptrs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(C + ptrs, mask=mask, other=0.0).to(tl.float32)
        s0 += tl.sum(do * a, 1)
        s1 += tl.sum(do * b, 1)
        s2 += tl.sum(do * c, 1)
        tl.store(DA + ptrs, (g0[:, None] * do).to(DA.dtype.element_ty), mask=mask)
        tl.store(DB + ptrs, (g1[:, None] * do).to(DB.dtype.element_ty), mask=mask)
        tl.store(DC + ptrs, (g2[:, None] * do).to(DC.dtype.element_ty), mask=mask)
    tl.store(DG + n * 3, s0, mask=n_ok)
    tl.store(DG + n * 3 + 1, s1, mask=n_ok)
    tl.store(DG + n * 3 + 2, s2, mask=n_ok)


def gate_combine_fwd(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor,
                     o_win: torch.Tensor) -> torch.Tensor:
    """``o [N, Hq, D]`` in the branches' dtype; all inputs contiguous."""
    n, f = o_cmp.shape[0], o_cmp.shape[1] * o_cmp.shape[2]
    o = torch.empty_like(o_cmp)
    if n == 0:
        return o
    cfg = CONFIG["fwd"]
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(f, cfg["BLOCK_F"]))
    _gate_combine_fwd_kernel[grid](gates, o_cmp, o_slc, o_win, o, n, f, BLOCK_N=cfg["BLOCK_N"],
                                   BLOCK_F=cfg["BLOCK_F"], num_warps=cfg["num_warps"])
    return o


def gate_combine_bwd(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor,
                     do: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(dgates [N, 3] in gates' dtype, do_cmp, do_slc, do_win [N, Hq, D])``; inputs contiguous."""
    n, f = o_cmp.shape[0], o_cmp.shape[1] * o_cmp.shape[2]
    d_branch = [torch.empty_like(o_cmp) for _ in range(3)]
    dg = torch.empty(n, 3, dtype=torch.float32, device=o_cmp.device)
    if n:
        cfg = CONFIG["bwd"]
        _gate_combine_bwd_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
            gates, o_cmp, o_slc, o_win, do, *d_branch, dg, n, f, BLOCK_N=cfg["BLOCK_N"], BLOCK_F=cfg["BLOCK_F"],
            num_warps=cfg["num_warps"])
    return (dg.to(gates.dtype), *d_branch)


class GateCombineFunction(torch.autograd.Function):
    """Autograd for :func:`gate_combine_fwd`."""

    @staticmethod
    def forward(ctx, gates, o_cmp, o_slc, o_win):  # type: ignore[override]
        gates, o_cmp, o_slc, o_win = (t.contiguous() for t in (gates, o_cmp, o_slc, o_win))
        ctx.save_for_backward(gates, o_cmp, o_slc, o_win)
        return gate_combine_fwd(gates, o_cmp, o_slc, o_win)

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        return gate_combine_bwd(*ctx.saved_tensors, do.contiguous())


def gate_combine(gates: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor) -> torch.Tensor:
    """Differentiable ``g0·o_cmp + g1·o_slc + g2·o_win``: gates ``[N, 3]``, branch outputs ``[N, Hq, D]`` of one
    dtype and shape. Returns ``[N, Hq, D]`` in that dtype."""
    if not (o_cmp.shape == o_slc.shape == o_win.shape) or gates.shape != (o_cmp.shape[0], 3):
        raise ValueError(f"expected gates [N, 3] and three branch outputs [N, Hq, D] of one shape, got "
                         f"{tuple(gates.shape)}, {tuple(o_cmp.shape)}, {tuple(o_slc.shape)}, {tuple(o_win.shape)}")
    if not (o_cmp.dtype == o_slc.dtype == o_win.dtype):
        raise ValueError(f"expected branch outputs of one dtype, got {o_cmp.dtype}, {o_slc.dtype}, {o_win.dtype}")
    return GateCombineFunction.apply(gates, o_cmp, o_slc, o_win)

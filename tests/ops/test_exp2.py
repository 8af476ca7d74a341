"""The exp2 variants of the attention kernels (d3s2.ops._exp2): the polynomial's accuracy (torch reference of the
formula), the Triton version against that reference (interpreter on CPU, compiled on CUDA), mode resolution."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (first import below)

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from d3s2.ops import _exp2  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _apply(X, Y, n, MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(Y + offs, _exp2.exp2(tl.load(X + offs, mask=ok, other=0.0), MODE), mask=ok)


def _run(x: torch.Tensor, mode: str) -> torch.Tensor:
    y = torch.empty_like(x)
    _apply[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), MODE=_exp2.resolve_mode(mode, x.device), BLOCK=256)
    return y


def _inputs(n: int = 3000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    # the attention range (<= 0, dense near 0), integers and half-integers (rounding ties), the clamp region
    x = torch.cat([-torch.rand(n, generator=gen) * 30, -torch.rand(n // 4, generator=gen) * 124,
                   torch.arange(-20, 1, 0.5), torch.tensor([-125.0, -124.5, 3.25, 0.4999])])
    return x.float()


def test_poly_reference_accuracy():
    x = _inputs()
    ref = torch.exp2(x.double())
    rel = ((_exp2.exp2_poly_ref(x).double() - ref) / ref).abs().max().item()
    assert rel < 8e-5  # the fit's bound (7.5e-5) plus float32 rounding: a third of a float16 ulp
    # below the clamp the result is the tiny normal 2^-125·p, not 0 or garbage; -inf (masked logits) too
    low = _exp2.exp2_poly_ref(torch.tensor([-200.0, float("-inf")]))
    assert torch.all((low > 0) & (low < 3e-38))


@pytest.mark.parametrize("mode", ["mufu", "poly", "mix", "mix4"])
def test_triton_exp2_modes(mode):
    x = _inputs().to(DEV)
    y = _run(x, mode).cpu().double()
    ref = torch.exp2(x.cpu().double())
    rel = ((y - ref) / ref).abs()
    assert rel.max().item() < (1e-5 if mode == "mufu" else 8e-5), rel.max().item()
    if _exp2.resolve_mode(mode, x.device) == "poly":
        # the kernel's formula is the reference's, up to FMA contraction (a float32 ulp or two)
        want = _exp2.exp2_poly_ref(x.cpu()).double()
        assert ((y - want) / want).abs().max().item() < 3e-7


def test_resolve_mode():
    assert _exp2.resolve_mode("mix", torch.device("cpu")) == "poly"
    assert _exp2.resolve_mode("mufu", torch.device("cpu")) == "mufu"
    with pytest.raises(ValueError, match="exp2 mode"):
        _exp2.resolve_mode("f16x2", torch.device("cpu"))

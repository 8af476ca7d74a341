"""The fused DiT norms (triton backend) against the reference, dense and ragged, fp32 and bf16.

Without CUDA the kernels run under TRITON_INTERPRET=1 on tiny shapes; the ``gpu`` tests use full-size shapes.
Low-precision checks follow the flash-attention idiom: the kernel's error against a float64 reference is at
most twice the torch path's own error (plus a rounding floor).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (first import below)

pytest.importorskip("triton")

from d3s2.ops.dit_norm import add_norm, add_norm_ref, qk_rms_norm_, qk_rms_norm_ref_  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(m: int, c: int, b: int, dtype: torch.dtype, ragged: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed + m + c)
    x = torch.randn(m, c, generator=g) * 3 + 0.5
    u = torch.randn(m, c, generator=g)
    mod = torch.randn(b, 6 * c, generator=g) * 0.5  # chunks are strided [B, C] views, as in the block
    w, bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    if ragged:
        counts = torch.randint(0, 2 * m // b + 1, (b,), generator=g)
        counts[-1] = m - counts[:-1].sum().clamp_max(m)
        counts = counts.clamp_min(0)
        sample = torch.repeat_interleave(torch.arange(b), counts)[:m]
        sample = torch.cat([sample, sample.new_full((m - sample.numel(),), b - 1)])
    else:
        sample = m // b
    to = lambda t: t.to(DEV, dtype)  # noqa: E731
    return to(x), to(u), to(mod), to(w), to(bias), sample.to(DEV) if ragged else sample


def _check(got: torch.Tensor, ref64: torch.Tensor, torch_path: torch.Tensor) -> None:
    assert got.dtype == torch_path.dtype and got.shape == ref64.shape
    err = (got.double() - ref64).abs().max().item()
    base = (torch_path.double() - ref64).abs().max().item()
    floor = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[got.dtype] * ref64.abs().max().item()
    assert err <= 2 * base + floor, (err, base)


MODES = {  # which pieces of the block a call fuses
    "modulate": dict(update=False, gate=False, affine=False, mod=True, normalize=True),
    "gate_affine": dict(update=True, gate=True, affine=True, mod=False, normalize=True),
    "add_modulate": dict(update=True, gate=False, affine=False, mod=True, normalize=True),
    "gated_residual": dict(update=True, gate=True, affine=False, mod=False, normalize=False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("m,c,b,ragged", [(12, 24, 2, False), (13, 40, 3, True), (7, 16, 1, True)])
def test_add_norm_matches_reference(m, c, b, ragged, mode, dtype):
    """C not a power of two, rows not a multiple of the tile, ragged samples (some empty) and equal ones."""
    f = MODES[mode]
    x, u, mod, w, bias, sample = _case(m, c, b, dtype, ragged)
    shift, scale, gate = mod[:, :c], mod[:, c:2 * c], mod[:, 2 * c:3 * c]
    kw = dict(weight=w if f["affine"] else None, bias=bias if f["affine"] else None,
              shift=shift if f["mod"] else None, scale=scale if f["mod"] else None, eps=1e-6,
              normalize=f["normalize"], sample=sample)
    args = (u if f["update"] else None, gate if f["gate"] else None)
    r, y = add_norm(x, *args, backend="triton", **kw)
    r_pt, y_pt = add_norm(x, *args, backend="torch", **kw)
    d64 = lambda t: None if t is None else t.double()  # noqa: E731
    r64, y64 = add_norm_ref(x.double(), *map(d64, args), **{k: d64(v) if isinstance(v, torch.Tensor) and
                                                               v.is_floating_point() else v for k, v in kw.items()})
    if f["update"]:
        _check(r, r64, r_pt)
    else:
        assert r is x
    if f["normalize"]:
        # the kernel normalises the stored (rounded) residual, like the torch path: compare from the same r
        _, y64 = add_norm_ref(r.double(), **{k: d64(v) if isinstance(v, torch.Tensor) and v.is_floating_point()
                                             else v for k, v in kw.items()})
        _check(y, y64, y_pt)
    else:
        assert y is None and y_pt is None


def test_add_norm_strided_rows_and_errors():
    x, u, mod, _, _, _ = _case(8, 16, 2, torch.float32, False)
    wide = torch.cat([x, x], 1)[:, :16]  # strided rows
    r, y = add_norm(wide, u, mod[:, :16], sample=4, backend="triton")
    r_ref, _ = add_norm_ref(x, u, mod[:, :16], sample=4)
    torch.testing.assert_close(r, r_ref)
    with pytest.raises(ValueError, match="samples"):
        add_norm(x, u, mod[:, :16], sample=3, backend="triton")
    with pytest.raises(ValueError, match="sample map"):
        add_norm(x, shift=mod[:, :16], scale=mod[:, 16:32], backend="triton")
    empty = x[:0]
    r, y = add_norm(empty, empty, mod[:, :16], shift=mod[:, 16:32], scale=mod[:, 32:48], sample=0, backend="triton")
    assert r.shape == y.shape == (0, 16)
    with pytest.raises(RuntimeError, match="forward-only"):
        add_norm(x.requires_grad_(), backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 4, 16), (7, 3, 3, 20)], ids=["dense", "ragged_d20"])
def test_qk_rms_norm_matches_reference(shape, dtype):
    """In place on a fused qkv output (a view of a [.., 3·H·D] projection), D not a power of two; v untouched."""
    g = torch.Generator().manual_seed(len(shape))
    h, d = shape[-2:]
    proj = (torch.randn(*shape[:-3], 3 * h * d, generator=g) * 4).to(DEV, dtype)
    qkv = proj.view(shape)
    gq, gk = (torch.rand(h, d, generator=g) + 0.5).to(DEV, dtype), (torch.rand(h, d, generator=g) + 0.5).to(DEV, dtype)
    before = qkv.clone()
    out = qk_rms_norm_(qkv, gq, gk, backend="triton")
    assert out is qkv
    pt = qk_rms_norm_(before.clone(), gq, gk, backend="torch")
    ref = qk_rms_norm_ref_(before.double(), gq.double(), gk.double())
    _check(qkv, ref, pt)
    assert torch.equal(qkv.select(-3, 2), before.select(-3, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("ragged", [False, True], ids=["dense", "ragged"])
def test_full_size_bf16_gpu(ragged):
    """Full-size dense step shapes (2 × 4096 tokens × 1024) and a ragged sparse batch, bf16 on CUDA."""
    m, c = 8192, 1024
    x, u, mod, w, bias, sample = _case(m, c, 2, torch.bfloat16, ragged)
    shift, scale, gate = mod[:, :c], mod[:, c:2 * c], mod[:, 2 * c:3 * c]
    for kw in (dict(shift=shift, scale=scale), dict(weight=w, bias=bias)):
        r, y = add_norm(x, u, gate, sample=sample, backend="triton", **kw)
        r_pt, y_pt = add_norm(x, u, gate, sample=sample, backend="torch", **kw)
        _check(r, add_norm_ref(x.double(), u.double(), gate.double(), sample=sample)[0], r_pt)
        _check(y, add_norm_ref(r.double(), weight=None if "weight" not in kw else w.double(),
                               bias=None if "bias" not in kw else bias.double(),
                               shift=None if "shift" not in kw else shift.double(),
                               scale=None if "scale" not in kw else scale.double(), sample=sample)[1], y_pt)
    qkv = (torch.randn(2, 4096, 3 * 1024, device="cuda") * 3).bfloat16().view(2, 4096, 3, 16, 64)
    gq = torch.rand(16, 64, device="cuda").bfloat16() + 0.5
    pt = qk_rms_norm_(qkv.clone(), gq, gq, backend="torch")
    ref = qk_rms_norm_ref_(qkv.double(), gq.double(), gq.double())
    _check(qk_rms_norm_(qkv, gq, gq, backend="triton"), ref, pt)

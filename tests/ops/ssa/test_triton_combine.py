"""The fused gate combine and the whole SSA op on the triton backend against the reference.

Without CUDA the kernels run under TRITON_INTERPRET=1 on tiny ragged batches; with CUDA, compiled.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (first import below)

pytest.importorskip("triton")

from d3s2.ops.ssa import spatial_sparse_attention  # noqa: E402
from d3s2.ops.ssa import triton_combine as tcomb  # noqa: E402
from d3s2.ops.ssa.reference import (  # noqa: E402
    combine_ref,
    compressed_attention_ref,
    selection_attention_ref,
    window_attention_ref,
)

from .helpers import layout_for, make_inputs, random_batch  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n,hq,d,block_f", [(37, 3, 20, 16), (5, 2, 8, 256), (0, 2, 8, 16)])
def test_gate_combine_matches_reference(n, hq, d, block_f, dtype, monkeypatch):
    """Forward and every gradient; N not a multiple of the token tile, F = Hq·D not a multiple of BLOCK_F."""
    for key in ("fwd", "bwd"):
        monkeypatch.setitem(tcomb.CONFIG, key, {**tcomb.CONFIG[key], "BLOCK_F": block_f})
    g = torch.Generator().manual_seed(n + d)
    gates, a, b, c = (torch.rand(n, 3, generator=g), *(torch.randn(n, hq, d, generator=g) for _ in range(3)))
    do = torch.randn(n, hq, d, generator=g).to(DEV, dtype)
    ins = [t.to(DEV, dtype).requires_grad_() for t in (gates, a, b, c)]
    o = tcomb.gate_combine(*ins)
    o.backward(do)
    ref_ins = [t.detach().double().requires_grad_() for t in ins]
    o_ref = combine_ref(*ref_ins)
    o_ref.backward(do.double())  # the same (rounded) dO
    assert o.dtype == dtype and o.shape == (n, hq, d)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(o.double(), o_ref, atol=tol, rtol=tol)
    for name, got, ref in zip(("dgates", "do_cmp", "do_slc", "do_win"), ins, ref_ins):
        assert got.grad.dtype == dtype, name
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=tol, rtol=tol, msg=name)


def test_gate_combine_rejects_mismatched_shapes():
    a = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match="expected gates"):
        tcomb.gate_combine(torch.zeros(4, 2), a, a, a)
    with pytest.raises(ValueError, match="one dtype"):
        tcomb.gate_combine(torch.zeros(4, 3), a, a.half(), a)


@pytest.mark.parametrize("m_cmp,m_slc,m_win,shift,topk", [(2, 4, 4, 2, 3), (4, 4, 4, 0, 2)])
def test_ssa_triton_op_matches_reference(m_cmp, m_slc, m_win, shift, topk):
    """The whole op (compressed + top-k + selection + window + fused combine), output and every gradient, on a
    ragged batch with a single-token sample; the reference reuses the kernel's selection (piecewise constant)."""
    x = random_batch([45, 1, 20], 12, seed=3).to(DEV)
    layout = layout_for(x, m_cmp, m_slc, m_win, shift)
    ins = make_inputs(x, layout, 4, 2, 8, seed=5, device=DEV)
    do = torch.randn(layout.num_tokens, 4, 8, generator=torch.Generator().manual_seed(1)).to(DEV)
    leaves = [t.clone().requires_grad_() for t in ins]
    o, block_idx = spatial_sparse_attention(*leaves, layout, topk=topk, backend="triton", return_block_idx=True)
    o.backward(do)
    ref = [t.detach().double().requires_grad_() for t in ins]
    q, k, v, k_cmp, v_cmp, gates = ref
    o_ref = combine_ref(gates, compressed_attention_ref(q, k_cmp, v_cmp, layout)[0],
                        selection_attention_ref(q, k, v, layout, block_idx), window_attention_ref(q, k, v, layout))
    o_ref.backward(do.double())
    torch.testing.assert_close(o.double(), o_ref, atol=2e-5, rtol=1e-4)
    for name, got, want in zip(("dq", "dk", "dv", "dk_cmp", "dv_cmp", "dgates"), leaves, ref):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=5e-5, rtol=1e-4, msg=name)

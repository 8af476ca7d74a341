"""GPU: the triton SSA backend against the reference, forward and every gradient, fp32 / fp16 / bf16.

Bound (flash-attention test idiom): kernel error vs a float64 reference ≤ 2 × the same-dtype torch reference's
error + a small atol. The selection is piecewise constant, so the full-op references reuse the kernel's
``block_idx``; the top-k itself is checked against float64 scores (every chosen block within rounding of the
reference's k-th best).
"""

from __future__ import annotations

import pytest
import torch

from d3s2.ops.ssa import spatial_sparse_attention
from d3s2.ops.ssa.reference import (
    block_scores_ref,
    combine_ref,
    compressed_attention_ref,
    select_blocks_ref,
    selection_attention_ref,
    window_attention_ref,
)

from .helpers import layout_for, make_inputs, random_batch
from .test_triton_compress import assert_topk_equivalent

pytestmark = pytest.mark.gpu

CONFIGS = {  # m_cmp, m_slc, m_win, shift, topk
    "v1.1": (8, 8, 8, 0, 8),
    "v1.1-shifted": (8, 8, 8, 4, 8),
    "v1.0": (4, 8, 8, 4, 8),
    "v1.0-512": (4, 8, 8, 0, 32),
}
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _check(name, got, lo, hi, dtype):
    e_k, e_t = _err(got, hi), _err(lo, hi)
    assert e_k <= 2 * e_t + ATOL[dtype], f"{name}: kernel error {e_k:.3g} > 2 × torch {dtype} error {e_t:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("d", [32, 64])
def test_ssa_triton_matches_reference(config, dtype, d):
    if d == 64 and dtype != torch.bfloat16:
        pytest.skip("head dim 64 checked in bf16 only (compile time)")
    m_cmp, m_slc, m_win, shift, topk = CONFIGS[config]
    # ragged: a large sample, a single-token sample, and one with fewer selection blocks than top-k
    x = random_batch([1900, 1, 37], 64, seed=d, compact=(2,)).to("cuda")
    layout = layout_for(x, m_cmp, m_slc, m_win, shift)
    ins = make_inputs(x, layout, 8, 2, d, dtype=torch.float32, seed=d, device="cuda")
    ins = [t.to(dtype) for t in ins]
    do = torch.randn(layout.num_tokens, 8, d, device="cuda").to(dtype)

    leaves = [t.clone().requires_grad_() for t in ins]
    o, block_idx = spatial_sparse_attention(*leaves, layout, topk=topk, backend="triton", return_block_idx=True)
    o.backward(do)
    slc_counts = (layout.cu_slc[1:] - layout.cu_slc[:-1]).tolist()
    assert slc_counts[1] == 1 and slc_counts[2] < topk  # the ragged cases this test is meant to cover

    def reference(cast):
        ref_in = [t.detach().to(cast).requires_grad_() for t in ins]
        q, k, v, k_cmp, v_cmp, gates = ref_in
        o_cmp, _ = compressed_attention_ref(q, k_cmp, v_cmp, layout)
        o_ref = combine_ref(gates, o_cmp, selection_attention_ref(q, k, v, layout, block_idx),
                            window_attention_ref(q, k, v, layout))
        o_ref.backward(do.to(cast))
        return o_ref, [t.grad for t in ref_in]

    o_hi, g_hi = reference(torch.float64)
    o_lo, g_lo = reference(dtype)
    _check("o", o, o_lo, o_hi, dtype)
    for name, leaf, lo, hi in zip(["dq", "dk", "dv", "dk_cmp", "dv_cmp", "dgates"], leaves, g_lo, g_hi):
        _check(name, leaf.grad, lo, hi, dtype)

    # the selection: top-k of float64 scores computed from the same (rounded) inputs
    q, _, _, k_cmp, _, _ = (t.double() for t in ins)
    _, lse = compressed_attention_ref(q, k_cmp, ins[4].double(), layout)
    ref_idx = select_blocks_ref(q, k_cmp, lse, layout, topk=topk)
    scores = [s.cpu() for s in block_scores_ref(q, k_cmp, lse, layout)]
    assert_topk_equivalent(block_idx.cpu(), ref_idx.cpu(), scores, layout, rtol=1e-3)



@pytest.mark.parametrize("config,mode", [("v1.1", "mix"), ("v1.0", "mix"), ("v1.1", "mix4"), ("v1.1", "poly")])
def test_ssa_triton_fma_exps(config, mode, monkeypatch):
    """Forward softmax exps on the FMA pipe (all, or a half / quarter by inline PTX): the same bf16 criterion, every
    gradient, and the top-k within rounding of the float64 reference's k-th best."""
    from d3s2.ops.block_attn import triton as ba_kernels
    from d3s2.ops.ssa import triton_compress as tc

    for key in ("fwd", "topk", "topk_seg"):
        monkeypatch.setitem(tc.CONFIG, key, {**tc.CONFIG[key], "exp2": mode})
    monkeypatch.setattr(ba_kernels, "FWD_CONFIG", {**ba_kernels.FWD_CONFIG, "exp2": mode, "split": True})
    test_ssa_triton_matches_reference(config, torch.bfloat16, 32)


@pytest.mark.parametrize("config", ["v1.1", "v1.0"])
def test_ssa_triton_topk_options(config, monkeypatch):
    """The top-k with int32 keys, the logit tile in four row chunks, the LSE shift in the logit matmul and counted
    rounds: the same bf16 criterion, every gradient, and the selection within rounding of the float64 reference's
    k-th best."""
    from d3s2.ops.ssa import triton_compress as tc

    for key in ("topk", "topk_seg"):
        monkeypatch.setitem(tc.CONFIG, key, {**tc.CONFIG[key], "key32": True, "m_split": 4, "counted": True,
                                             "lse_dot": True})
    test_ssa_triton_matches_reference(config, torch.bfloat16, 32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("config", ["v1.1", "v1.0"])
def test_ssa_triton_topk_head_sum_in_registers(config, dtype, monkeypatch):
    """The top-k's head sum in registers (16-bit inputs) in two row chunks (4 heads per group here: 2 per chunk,
    the smallest it takes; the default's 4 chunks fall back to the group matmul at this shape, which the test above
    covers): the same criterion, every gradient, the selection within rounding of float64."""
    from d3s2.ops.ssa import triton_compress as tc

    for key in ("topk", "topk_seg"):
        monkeypatch.setitem(tc.CONFIG, key, {**tc.CONFIG[key], "m_split": 2, "head_sum": "regs"})
    test_ssa_triton_matches_reference(config, dtype, 32)


@pytest.mark.parametrize("hq,hkv,d", [(2, 2, 32), (4, 2, 128)])
def test_ssa_triton_topk_float32_fits_shared_memory(hq, hkv, d):
    """float32 inputs with one or two query heads per kv head (256 / 128 tokens per top-k program) and wide heads:
    the top-k's default config would need more shared memory than an H100 / H200 block may have (it overflowed in
    the float32 pipeline test); it now shrinks on the host to fit. The top-k against float64 scores."""
    from d3s2.ops.ssa import triton_compress as tc

    m_cmp, m_slc, m_win, shift, topk = CONFIGS["v1.1"]
    x = random_batch([1900, 1, 37], 64, seed=d + hq, compact=(2,)).to("cuda")
    layout = layout_for(x, m_cmp, m_slc, m_win, shift)
    q, _, _, k_cmp, v_cmp, _ = make_inputs(x, layout, hq, hkv, d, dtype=torch.float32, seed=d, device="cuda")
    _, lse = compressed_attention_ref(q.double(), k_cmp.double(), v_cmp.double(), layout)
    idx = tc.cmp_select_topk(q, k_cmp, lse.float(), layout, topk, d**-0.5)
    ref_idx = select_blocks_ref(q.double(), k_cmp.double(), lse, layout, topk=topk)
    scores = [s.cpu() for s in block_scores_ref(q.double(), k_cmp.double(), lse, layout)]
    assert_topk_equivalent(idx.cpu(), ref_idx.cpu(), scores, layout, rtol=1e-4)

"""The SSA spec (ops/ssa/reference.py) against dense brute force built from coordinates alone."""

from __future__ import annotations

import pytest
import torch

from d3s2.ops.ssa.reference import (
    compressed_attention_ref,
    select_blocks_ref,
    selection_attention_ref,
    ssa_ref,
    window_attention_ref,
)

from .helpers import brute_force, layout_for, make_inputs, random_batch, selected_mask

CASES = [
    # sizes, resolution, m_cmp, m_slc, m_win, shift, topk
    ([40, 1, 23], 12, 2, 4, 4, 2, 3),   # single-token sample, shifted windows, m_slc = 2·m_cmp
    ([57], 16, 4, 4, 4, 0, 2),          # m_cmp = m_slc, windows = selection blocks
    ([30, 9], 8, 1, 2, 4, 0, 50),       # blocks of one token; top-k larger than the number of blocks
]


@pytest.mark.parametrize("sizes,res,m_cmp,m_slc,m_win,shift,topk", CASES)
def test_reference_matches_brute_force(sizes, res, m_cmp, m_slc, m_win, shift, topk):
    x = random_batch(sizes, res, seed=len(sizes) + res)
    layout = layout_for(x, m_cmp, m_slc, m_win, shift)
    q, k, v, k_cmp, v_cmp, gates = make_inputs(x, layout, 4, 2, 8, dtype=torch.float64, seed=res)
    o, block_idx = ssa_ref(q, k, v, k_cmp, v_cmp, gates, layout, topk=topk, return_block_idx=True)
    o_bf, o_cmp_bf, o_slc_bf, o_win_bf, selected_bf = brute_force(x, layout, q, k, v, k_cmp, v_cmp, gates, topk)

    o_cmp, lse = compressed_attention_ref(q, k_cmp, v_cmp, layout)
    torch.testing.assert_close(o_cmp, o_cmp_bf)
    assert torch.equal(selected_mask(layout, block_idx), selected_bf)
    torch.testing.assert_close(selection_attention_ref(q, k, v, layout, block_idx), o_slc_bf)
    torch.testing.assert_close(window_attention_ref(q, k, v, layout), o_win_bf)
    torch.testing.assert_close(o, o_bf)

    # Layout invariants: valid entries come first, best first, and belong to the query's own sample.
    counts = (layout.cu_slc[1:] - layout.cu_slc[:-1]).long()
    b = x.coords[layout.perm, 0].long()
    n_valid = (block_idx >= 0).sum(-1)
    assert torch.equal(n_valid, counts[b].clamp(max=topk)[:, None].expand_as(n_valid))
    lo, hi = layout.cu_slc[b][:, None, None], layout.cu_slc[b + 1][:, None, None]
    assert bool(((block_idx < 0) | ((block_idx >= lo) & (block_idx < hi))).all())


def test_lse_is_natural_log():
    x = random_batch([20], 8)
    layout = layout_for(x, 2, 4, 4, 0)
    q, _, _, k_cmp, v_cmp, _ = make_inputs(x, layout, 2, 1, 4, dtype=torch.float64)
    _, lse = compressed_attention_ref(q, k_cmp, v_cmp, layout)
    logits = torch.einsum("nhd,cd->nhc", q, k_cmp[:, 0]) * 4**-0.5
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))


def test_gradcheck_float64():
    x = random_batch([9, 1, 6], 8, seed=3)
    layout = layout_for(x, 2, 4, 4, 2)
    inputs = [t.requires_grad_() for t in make_inputs(x, layout, 4, 2, 4, dtype=torch.float64, seed=5)]
    # Gradients flow through o_cmp and the attention over the selected tokens; the selection itself is constant.
    assert torch.autograd.gradcheck(lambda *a: ssa_ref(*a, layout, topk=2), inputs, eps=1e-6, atol=1e-7,
                                     fast_mode=True)


def test_selection_ignores_scores_gradient():
    x = random_batch([12], 8, seed=1)
    layout = layout_for(x, 2, 4, 4, 0)
    q, _, _, k_cmp, v_cmp, _ = make_inputs(x, layout, 2, 1, 4, dtype=torch.float64)
    q.requires_grad_()
    _, lse = compressed_attention_ref(q, k_cmp, v_cmp, layout)
    idx = select_blocks_ref(q, k_cmp, lse, layout, topk=2)
    assert idx.dtype == torch.int32 and not idx.requires_grad

"""The pure-torch block attention references against brute-force dense masked attention (float64)."""

from __future__ import annotations

import pytest
import torch

from d3s2.ops.block_attn import (
    selection_attention,
    selection_attention_ref,
    window_attention,
    window_attention_ref,
)

from ._cases import dense_masked_attention, ragged_offsets, random_selection

SIZES = [3, 1, 7, 5, 1, 9, 4]  # ragged blocks incl. one-token blocks; N = 30


def _qkv(n, hq, hkv, d, dtype=torch.float64, grad=False):
    q = torch.randn(n, hq, d, dtype=dtype, requires_grad=grad)
    k = torch.randn(n, hkv, d, dtype=dtype, requires_grad=grad)
    v = torch.randn(n, hkv, d, dtype=dtype, requires_grad=grad)
    return q, k, v


@pytest.mark.parametrize("hq,hkv,s", [(4, 2, 3), (2, 2, 1), (4, 1, 9), (8, 2, 2)])
def test_selection_matches_dense(hq, hkv, s):
    off = ragged_offsets(SIZES)
    n = int(off[-1])
    q, k, v = _qkv(n, hq, hkv, 8)
    idx = random_selection(n, hkv, s, len(SIZES), empty_frac=0.3)
    idx[0] = -1  # a query with no block at all outputs 0
    o, lse = selection_attention_ref(q, k, v, off, idx, scale=0.7, return_lse=True)
    ref = dense_masked_attention(q, k, v, off, idx, scale=0.7)
    torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-12)
    assert torch.all(o[0] == 0) and torch.all(torch.isneginf(lse[0]))
    assert torch.isfinite(lse[1:][(idx[1:] >= 0).any(-1).repeat_interleave(hq // hkv, 1)]).all()


def test_selection_lse_is_logsumexp():
    off = ragged_offsets(SIZES)
    n = int(off[-1])
    q, k, v = _qkv(n, 2, 1, 4)
    idx = random_selection(n, 1, 2, len(SIZES), empty_frac=0.0)
    _, lse = selection_attention_ref(q, k, v, off, idx, return_lse=True)
    i, h = 5, 1
    toks = torch.cat([torch.arange(int(off[b]), int(off[b + 1])) for b in idx[i, 0].tolist()])
    expect = torch.logsumexp(k[toks, 0] @ q[i, h] * 4**-0.5, 0)
    torch.testing.assert_close(lse[i, h], expect)


def test_window_matches_dense():
    off = ragged_offsets(SIZES)
    n = int(off[-1])
    q, k, v = _qkv(n, 4, 2, 8)
    window_of = torch.searchsorted(off.long(), torch.arange(n), right=True) - 1
    idx = window_of.to(torch.int32)[:, None, None].expand(n, 2, 1)
    torch.testing.assert_close(window_attention_ref(q, k, v, off), dense_masked_attention(q, k, v, off, idx))


def test_gradcheck_selection():
    off = ragged_offsets([2, 1, 3, 2])
    n = int(off[-1])
    q, k, v = _qkv(n, 2, 1, 2, grad=True)
    idx = random_selection(n, 1, 2, 4, empty_frac=0.0)
    assert torch.autograd.gradcheck(lambda q, k, v: selection_attention_ref(q, k, v, off, idx), (q, k, v))


def test_gradcheck_window():
    off = ragged_offsets([3, 1, 4])
    n = int(off[-1])
    q, k, v = _qkv(n, 2, 1, 3, grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: window_attention_ref(q, k, v, off), (q, k, v))


def test_low_precision_dtype_and_shapes():
    off = ragged_offsets(SIZES)
    n = int(off[-1])
    q, k, v = _qkv(n, 4, 2, 8, dtype=torch.bfloat16)
    idx = random_selection(n, 2, 3, len(SIZES))
    o, lse = selection_attention(q, k, v, off, idx, backend="torch", return_lse=True)
    assert o.dtype == torch.bfloat16 and o.shape == (n, 4, 8)
    assert lse.dtype == torch.float32 and lse.shape == (n, 4)
    ref = dense_masked_attention(q.double(), k.double(), v.double(), off, idx)
    assert (o.double() - ref).abs().max() < 0.05


def test_public_api_torch_backend_matches_reference():
    off = ragged_offsets(SIZES)
    n = int(off[-1])
    q, k, v = _qkv(n, 4, 2, 8)
    assert torch.equal(window_attention(q, k, v, off, backend="torch"), window_attention_ref(q, k, v, off))


@pytest.mark.parametrize("bad", ["heads", "idx_shape", "offsets_float", "window_end"])
def test_clear_errors(bad):
    off = ragged_offsets(SIZES)
    n = int(off[-1])
    q, k, v = _qkv(n, 4, 2, 8)
    idx = random_selection(n, 2, 2, len(SIZES))
    with pytest.raises(ValueError, match="expected"):
        if bad == "heads":
            selection_attention_ref(q[:, :3], k, v, off, idx)
        elif bad == "idx_shape":
            selection_attention_ref(q, k, v, off, idx[:, :1])
        elif bad == "offsets_float":
            selection_attention_ref(q, k, v, off.float(), idx)
        else:
            window_attention_ref(q, k, v, off[:-1])

import pytest
import torch

from d3s2.models.dit import ConditionTokens
from d3s2.models.dit.blocks import (
    CrossAttention,
    MultiHeadRMSNorm,
    SparseFullAttention,
    attention,
    pad_ragged,
    ragged_pad_plan,
    sparse_pad_plan,
)
from d3s2.sparse import SparseTensor

from .common import random_sparse


def _naive(q, k, v):
    """Per-head softmax attention ``q [Tq, H, D]``, ``k, v [Tk, H, D]``."""
    s = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def test_pad_ragged_roundtrip_and_mask():
    x = torch.arange(7.0)[:, None]
    cu = torch.tensor([0, 2, 2, 7], dtype=torch.int32)  # middle sample is empty
    padded, rows, valid = pad_ragged(x, cu)
    assert padded.shape == (3, 5, 1)
    assert torch.equal(padded[rows[0], rows[1]], x)
    assert valid.tolist() == [[True, True, False, False, False], [False] * 5, [True] * 5]


def test_pad_plan_uniform_lengths_is_a_reshape_equal_to_the_scatter():
    x = torch.randn(6, 2, 3)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    plan = ragged_pad_plan(cu)
    assert plan.uniform and plan.max_len == 3
    padded, rows, valid = pad_ragged(x, cu, plan)
    assert torch.equal(padded, x.view(2, 3, 2, 3)) and bool(valid.all())
    assert torch.equal(padded[rows[0], rows[1]], x)
    ragged = ragged_pad_plan(torch.tensor([0, 2, 6], dtype=torch.int32))
    assert not ragged.uniform and ragged.max_len == 4


def test_cross_and_full_attention_same_with_cached_pad_plan_on_a_cfg_pair():
    x = random_sparse(counts=(5,), channels=16)
    pair = SparseTensor.cat([x, x.replace(torch.randn_like(x.feats))])  # equal halves: the uniform path
    plan = sparse_pad_plan(pair)
    assert plan.uniform and sparse_pad_plan(pair) is plan  # cached on the structure
    xattn = CrossAttention(16, 12, num_heads=2)
    cond = ConditionTokens(torch.randn(2, 4, 12))
    fast = xattn(pair.feats, cond, pair.cu_seqlens, pad_plan=plan)
    cu = pair.cu_seqlens.tolist()
    for b in range(2):
        ref = xattn(pair.feats[None, cu[b]:cu[b + 1]], ConditionTokens(cond.tokens[b:b + 1]))[0]
        torch.testing.assert_close(fast[cu[b]:cu[b + 1]], ref)
    attn = SparseFullAttention(16, 4, 2)
    out = attn(pair).feats
    for b in range(2):
        one = SparseTensor(pair.feats[cu[b]:cu[b + 1]], x.coords, resolution=x.resolution, batch_size=1)
        torch.testing.assert_close(out[cu[b]:cu[b + 1]], attn(one).feats)


def test_gqa_attention_matches_naive_and_masked_keys_are_ignored():
    q, k, v = torch.randn(2, 5, 4, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    out = attention(q, k, v)
    for b in range(2):
        ref = _naive(q[b], k[b].repeat_interleave(2, 1), v[b].repeat_interleave(2, 1))
        torch.testing.assert_close(out[b], ref)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    out = attention(q, k, v, mask)
    ref = _naive(q[1], k[1, :3].repeat_interleave(2, 1), v[1, :3].repeat_interleave(2, 1))
    torch.testing.assert_close(out[1], ref)
    empty = attention(q, k, v, torch.zeros(2, 6, dtype=torch.bool))
    assert torch.isfinite(empty).all()


def test_rms_norm_unit_rms_times_gamma():
    norm = MultiHeadRMSNorm(8, 2)
    with torch.no_grad():
        norm.gamma.copy_(torch.rand(2, 8) + 0.5)
    x = torch.randn(3, 2, 8) * 5
    y = norm(x)
    torch.testing.assert_close(y / norm.gamma, x / x.square().mean(-1, keepdim=True).sqrt())


def test_sparse_full_attention_is_per_sample_attention():
    x = random_sparse(counts=(3, 1, 6), channels=16)
    attn = SparseFullAttention(16, num_heads=4, num_kv_heads=2)
    out = attn(x)
    assert torch.equal(out.coords, x.coords)
    cu = x.cu_seqlens.tolist()
    for b in range(3):
        f = x.feats[cu[b]:cu[b + 1]]
        q = attn.proj_q(f).view(-1, 4, 4)
        k = attn.proj_k(f).view(-1, 2, 4).repeat_interleave(2, 1)
        v = attn.proj_v(f).view(-1, 2, 4).repeat_interleave(2, 1)
        ref = attn.proj_o(_naive(q, k, v).reshape(-1, 16))
        torch.testing.assert_close(out.feats[cu[b]:cu[b + 1]], ref)


def test_cross_attention_ragged_queries_and_padded_conditions():
    xattn = CrossAttention(16, 12, num_heads=2)
    x = random_sparse(counts=(4, 7), channels=16)
    lengths = [3, 5]
    tokens = torch.randn(2, 5, 12)
    mask = torch.arange(5)[None] < torch.tensor(lengths)[:, None]
    cond = ConditionTokens(tokens, mask, torch.zeros(2, 5, 3, dtype=torch.long))
    out = xattn(x.feats, cond, x.cu_seqlens)
    cu = x.cu_seqlens.tolist()
    for b in range(2):
        one = ConditionTokens(tokens[b:b + 1, :lengths[b]])
        ref = xattn(x.feats[None, cu[b]:cu[b + 1]], one)[0]
        torch.testing.assert_close(out[cu[b]:cu[b + 1]], ref)


def test_condition_tokens_cat_drop_and_errors():
    a = ConditionTokens(torch.randn(1, 3, 4), torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3, 3))
    b = ConditionTokens(torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 5, 3))
    c = ConditionTokens.cat([a, b])
    assert c.tokens.shape == (3, 5, 4) and c.mask.sum(1).tolist() == [3, 5, 5]
    assert torch.equal(c.tokens[0, 3:], torch.zeros(2, 4))
    d = b.drop(torch.tensor([True, False]))
    assert torch.count_nonzero(d.tokens[0]) == 0 and torch.equal(d.tokens[1], b.tokens[1])
    assert torch.count_nonzero(b.zeros_like().tokens) == 0
    with pytest.raises(ValueError, match="equal token counts"):
        ConditionTokens.cat([ConditionTokens(torch.randn(1, 3, 4)), ConditionTokens(torch.randn(1, 4, 4))])
    with pytest.raises(ValueError, match=r"shape \[B, L, C\]"):
        ConditionTokens(torch.randn(3, 4))


def _published_block(block, x, t_emb, cond):
    """The published block written out per token (modulation gathered per row), as the reference."""
    h = x.feats
    shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(t_emb)[x.batch_index].chunk(6, dim=-1)
    a = block.self_attn(x.replace(block.norm1(h) * (1 + scale1) + shift1)).feats
    h = h + gate1 * a
    cu = x.cu_seqlens.tolist()
    cross = [block.cross_attn(block.norm2(h)[None, cu[b]:cu[b + 1]], ConditionTokens(cond.tokens[b:b + 1]))[0]
             for b in range(x.batch_size)]
    h = h + torch.cat(cross)
    return h + gate2 * block.mlp(block.norm3(h) * (1 + scale2) + shift2)


@pytest.mark.parametrize("counts", [(6, 6), (4, 7)])  # equal halves (a [B, L, C] view) and ragged (rows per token)
def test_modulated_block_matches_the_published_formula_and_precomputed_kv(counts):
    from d3s2.models.dit.blocks import ModulatedCrossBlock

    from .common import perturb

    block = ModulatedCrossBlock(16, 12, 2, SparseFullAttention(16, 4, 2))
    perturb(block, scale=0.3)
    x = random_sparse(counts=counts, channels=16)
    t_emb, cond = torch.randn(2, 16), ConditionTokens(torch.randn(2, 5, 12))
    with torch.no_grad():
        out = block(x, t_emb, cond).feats
        torch.testing.assert_close(out, _published_block(block, x, t_emb, cond), rtol=1e-5, atol=1e-5)
        kv = block.cross_attn.project_kv(cond, x.feats.dtype)
        assert kv.shape == (2, 5, 2, 2, 8)
        assert torch.equal(block(x, t_emb, cond, kv).feats, out)


def test_constant_samples_skip_attention_with_the_same_result():
    xattn = CrossAttention(16, 12, num_heads=2)
    x = torch.randn(4, 5, 16)
    tokens = torch.randn(4, 6, 12)
    tokens[1:3] = torch.randn(2, 1, 12)  # samples 1 and 2: all tokens equal (zero tokens in CFG)
    cond = ConditionTokens(tokens)
    constant = (False, True, True, False)
    with torch.no_grad():
        ref = xattn(x, cond)
        out = xattn(x, cond, constant=constant)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        kv = xattn.project_kv(cond, x.dtype)
        assert torch.equal(out[1], out[1, :1].expand(5, -1))  # one row for every query of a constant sample
        torch.testing.assert_close(out[1, 0], xattn.to_out(kv[1, 0, 1].flatten()))
        assert torch.equal(xattn(x, cond, kv=kv, constant=(False,) * 4), ref)
        with pytest.raises(ValueError, match="constant flags"):
            xattn(x, cond, constant=(True,))


@pytest.mark.gpu
def test_half_precision_norms_on_cuda_match_float32_arithmetic():
    """The CUDA bf16 LayerNorm (no float32 copies) and the RMS norm rewrite against the float32 formulas."""
    import torch.nn.functional as F

    from d3s2.models.dit.blocks import layer_norm32

    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(4096, 1024, device="cuda", generator=g) * 3 + 1).bfloat16()
    w, b = torch.randn(1024, device="cuda", generator=g).bfloat16(), torch.randn(1024, device="cuda").bfloat16()
    ref = F.layer_norm(x.float(), (1024,), w.float(), b.float(), 1e-6).bfloat16()
    fast = layer_norm32(x, (1024,), w, b, 1e-6)
    torch.testing.assert_close(fast, ref, rtol=2**-7, atol=1e-5)  # at most one bf16 rounding step apart
    assert (fast == ref).float().mean() > 0.99
    norm = MultiHeadRMSNorm(64, 16).cuda()
    with torch.no_grad():
        norm.gamma.copy_(torch.rand(16, 64, device="cuda", generator=g) + 0.5)
    norm = norm.bfloat16()
    q = x.view(4096, 16, 64)
    ref = (F.normalize(q.float(), dim=-1) * norm.gamma.float() * 8.0).bfloat16()
    torch.testing.assert_close(norm(q), ref, rtol=2**-7, atol=1e-5)

"""SpatialSparseAttention: published parameter layout, compression against brute force, ordering, gradients."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # the triton backend test runs in the interpreter on CPU

from d3s2.models.attention import SpatialSparseAttention, map_published_ssa_state_dict
from d3s2.ops.ssa.reference import ssa_ref
from d3s2.sparse import SparseTensor

from ...ops.ssa.helpers import random_batch

# blocks.{i}.self_attn.* of the published sparse DiTs (from published-state-dicts.json, dim 1024).
PUBLISHED = {
    "v1.1": {"intra_block_pe": (8, 8, 8, 64), "proj_q.weight": (1024, 1024), "proj_k.weight": (64, 1024),
             "proj_v.weight": (64, 1024), "proj_o.weight": (1024, 1024),
             "compression_key.act_layers.0.conv.kernel": (64, 64), "compression_key.act_layers.0.conv.bias": (64,),
             "compression_value.act_layers.0.conv.kernel": (64, 64),
             "compression_value.act_layers.0.conv.bias": (64,), "gate.0.weight": (3, 1024)},
    "v1.0": {"intra_block_pe": (4, 4, 4, 64), "proj_q.weight": (1024, 1024), "proj_k.weight": (64, 1024),
             "proj_v.weight": (64, 1024), "proj_o.weight": (1024, 1024), "gate.0.weight": (3, 1024),
             **{f"compression_{kv}.{name}": shape for kv in ("key", "value") for name, shape in {
                 "act_layers.0.weight": (64,), "act_layers.0.bias": (64,),
                 "out_layers.0.conv.kernel": (27, 64, 64), "out_layers.0.conv.bias": (64,),
                 "out_layers.1.weight": (64,), "out_layers.1.bias": (64,),
                 "out_layers.3.conv.kernel": (27, 64, 64), "out_layers.3.conv.bias": (64,)}.items()}},
}


@pytest.mark.parametrize("version", ["v1.1", "v1.0"])
def test_published_state_dict_loads_after_key_mapping(version):
    cfg = SpatialSparseAttention.Config.v1_1() if version == "v1.1" else SpatialSparseAttention.Config.v1_0()
    m = SpatialSparseAttention(cfg)
    published = {k: torch.randn(s) for k, s in PUBLISHED[version].items()}
    mapped = map_published_ssa_state_dict(published)
    m.load_state_dict(mapped, strict=True)
    w = "compression_key.act_layers.0.weight" if version == "v1.1" else "compression_key.out_layers.0.weight"
    src = published[w.replace(".weight", ".conv.kernel")]
    assert torch.equal(m.state_dict()[w].reshape(src.shape), src)


def _small(version: str, **kw) -> SpatialSparseAttention:
    base = SpatialSparseAttention.Config.v1_1 if version == "v1.1" else SpatialSparseAttention.Config.v1_0
    args = {"dim": 24, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "compression_block": 2,
            "selection_block": 2 if version == "v1.1" else 4, "window_size": 4, "topk": 3, **kw}
    m = SpatialSparseAttention(base(**args)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def _input(sizes, res, dim, seed=0):
    x = random_batch(sizes, res, seed=seed)
    return x.replace(torch.randn(x.num_voxels, dim, dtype=torch.float64))


def _brute_compress_v1(layer, feats, coords, m):
    """Mean of silu(W f + b) over the tokens of each (batch, coords // m) cell, keyed by that cell."""
    conv = layer.act_layers[0]
    h = F.silu(feats @ conv.weight[0] + conv.bias)
    cells = torch.cat([coords[:, :1], coords[:, 1:] // m], 1)
    uniq, inv = torch.unique(cells, dim=0, return_inverse=True)
    return {tuple(c.tolist()): h[inv == i].mean(0) for i, c in enumerate(uniq)}


def test_v1_module_matches_brute_force_composition():
    m = _small("v1.1", shift_window=True)
    x = _input([40, 1, 25], 12, 24)
    out = m(x, backend="torch")
    layout = m.layout(x)
    cfg = m.config
    n, hkv, d = x.num_voxels, cfg.num_kv_heads, cfg.head_dim
    # independent compression: from caller-order coords, PE by coords % m_cmp
    c = x.coords.long()
    loc = c[:, 1:] % cfg.compression_block
    pe = m.intra_block_pe[loc[:, 0], loc[:, 1], loc[:, 2]]  # [N, Hkv·D]
    k, v = x.feats @ m.proj_k.weight.T, x.feats @ m.proj_v.weight.T
    kc = _brute_compress_v1(m.compression_key, k + pe, c, cfg.compression_block)
    vc = _brute_compress_v1(m.compression_value, v, c, cfg.compression_block)
    cells = [tuple(r) for r in layout.cmp_coords.tolist()]
    k_cmp = torch.stack([kc[cell] for cell in cells]).view(-1, hkv, d)
    v_cmp = torch.stack([vc[cell] for cell in cells]).view(-1, hkv, d)
    p = layout.perm
    q = (x.feats @ m.proj_q.weight.T)[p].view(n, -1, d)
    gates = torch.sigmoid(x.feats @ m.gate[0].weight.T)[p]
    o = ssa_ref(q, k[p].view(n, hkv, d), v[p].view(n, hkv, d), k_cmp, v_cmp, gates, layout, topk=cfg.topk)
    want = (o.reshape(n, -1) @ m.proj_o.weight.T)[layout.inverse]
    torch.testing.assert_close(out.feats, want)


def test_v2_compression_matches_dense_convolution():
    m = _small("v1.0")
    comp = m.compression_key
    x = _input([60], 8, 24, seed=2)
    layout = m.layout(x)
    feats = torch.randn(x.num_voxels, 16, dtype=torch.float64)  # block order
    got = comp(feats, x, layout)  # [NBc, 16]
    # dense re-computation on the 4³ grid of compression cells (one sample)
    coords = x.coords[layout.perm].long()
    gn0, conv0, gn1, conv1 = comp.act_layers[0], comp.out_layers[0], comp.out_layers[1], comp.out_layers[3]
    h = F.silu(F.group_norm(feats.T[None], gn0.num_groups, gn0.weight, gn0.bias)[0].T)
    cell = coords[:, 1:] // 2
    g = 4
    flat = (cell[:, 0] * g + cell[:, 1]) * g + cell[:, 2]
    active = torch.zeros(g**3, dtype=torch.bool)
    active[flat] = True
    cnt = torch.zeros(g**3, dtype=torch.float64).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))

    def pool(f):
        s = torch.zeros(g**3, f.shape[1], dtype=f.dtype).index_add_(0, flat, f)
        return s / cnt.clamp(min=1)[:, None]

    def conv(dense, layer):  # dense [g³, C] → submanifold conv, zero outside active cells
        w = layer.weight.view(3, 3, 3, 16, 16).permute(4, 3, 2, 1, 0)  # [C_out, C_in, dx, dy, dz]
        grid = dense.T.reshape(1, 16, g, g, g)
        out = F.conv3d(grid, w, layer.bias, padding=1)[0].reshape(16, -1).T
        return out * active[:, None]

    def gn(f, layer):
        a = f[active]
        return torch.zeros_like(f).index_put_((active.nonzero().squeeze(1),), F.group_norm(
            a.T[None], layer.num_groups, layer.weight, layer.bias)[0].T)

    y = conv(F.silu(gn(conv(pool(h), conv0), gn1)), conv1) + pool(feats)
    cc = layout.cmp_coords.long()
    want = y[(cc[:, 1] * g + cc[:, 2]) * g + cc[:, 3]]
    torch.testing.assert_close(got, want)


def test_caller_order_is_restored_and_gradients_flow():
    m = _small("v1.0", shift_window=True)
    x = _input([20, 2, 9], 8, 24, seed=4)
    out = m(x, backend="torch")
    # same tokens, shuffled inside each sample: the output rows follow the tokens
    cu = x.cu_seqlens.tolist()
    shuffle = torch.cat([torch.randperm(cu[b + 1] - cu[b]) + cu[b] for b in range(3)])
    xs = SparseTensor(x.feats[shuffle], x.coords[shuffle], resolution=x.resolution, batch_size=3)
    torch.testing.assert_close(m(xs, backend="torch").feats, out.feats[shuffle])
    out.feats.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_triton_backend_matches_torch_backend():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = _small("v1.1").float().to(dev)
    x = _input([30, 1], 8, 24, seed=5).to(dev)
    x = x.replace(x.feats.float())
    a = m(x, backend="torch").feats
    b = m(x, backend="triton").feats
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_block_mean_matches_segment_reduce_and_its_gradient(dtype):
    """The sync-free padded-gather mean equals torch.segment_reduce's: exactly up to float32 summation order
    (float32 / float64), and within one rounding of the bfloat16 output (both accumulate in float32)."""
    from d3s2.models.attention.ssa import _block_mean
    from d3s2.ops.ssa import build_ssa_layout

    x = _input([37, 3, 20], 8, 5, seed=3)
    layout = build_ssa_layout(x, m_cmp=2, m_slc=4, m_win=4)
    feats = x.feats.to(dtype).requires_grad_()
    got = _block_mean(feats, x, layout)
    lengths = (layout.cmp_offsets[1:] - layout.cmp_offsets[:-1]).long()
    ref_in = feats.detach().requires_grad_()
    ref = torch.segment_reduce(ref_in.float() if dtype != torch.float64 else ref_in, "mean", lengths=lengths,
                               axis=0).to(dtype)
    assert got.shape == (layout.num_cmp, 5) and got.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2.0**-7}[dtype]
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    w = torch.randn_like(got, dtype=torch.float32).to(dtype)
    (got * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(feats.grad, ref_in.grad, rtol=tol, atol=tol)
    assert torch.equal(_block_mean(feats.detach(), x, layout), got.detach())  # deterministic, cached rows
    if dtype == torch.float64:
        torch.autograd.gradcheck(lambda f: _block_mean(f, x, layout), (feats.detach().requires_grad_(),))

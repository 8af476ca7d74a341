"""The torch conv reference equals dense F.conv3d on the scattered grid, forward and gradients."""

import pytest
import torch
import torch.nn.functional as F

from d3s2 import sparse as sp
from d3s2.ops import use_backend
from tests.sparse.test_tensor import _random_sparse


def _torch_weight(weight):
    """d3s2 [27, Cin, Cout] (x fastest) -> F.conv3d [Cout, Cin, 3(x), 3(y), 3(z)]."""
    k, cin, cout = weight.shape
    return weight.reshape(3, 3, 3, cin, cout).permute(4, 3, 2, 1, 0)


@pytest.mark.parametrize("counts", [[30, 0, 1, 17], [1], [64]])
def test_submanifold_conv_matches_dense(counts):
    torch.set_default_dtype(torch.float64)
    x = _random_sparse(counts, resolution=6, channels=3)
    x = x.replace(x.feats.double().requires_grad_())
    conv = sp.SparseConv3d(3, 5).double()
    with use_backend("conv", "torch"):
        y = conv(x)
    dense_in = x.dense()
    ref = F.conv3d(dense_in, _torch_weight(conv.weight), conv.bias, padding=1)
    c = x.coords.long()
    ref_active = ref[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]
    torch.testing.assert_close(y.feats, ref_active)
    g = torch.randn_like(y.feats)
    grads = torch.autograd.grad(y.feats, [x.feats, conv.weight, conv.bias], g)
    grads_ref = torch.autograd.grad(ref_active, [x.feats, conv.weight, conv.bias], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_down_conv_matches_dense_stride2():
    torch.set_default_dtype(torch.float64)
    x = _random_sparse([40, 0, 9], resolution=8, channels=2)
    conv = sp.SparseDownConv3d(2, 4).double()
    y = conv(x)
    w = conv.weight.reshape(2, 2, 2, 2, 4).permute(4, 3, 2, 1, 0)
    ref = F.conv3d(x.dense(), w, conv.bias, stride=2)
    c = y.coords.long()
    assert y.resolution == 4
    torch.testing.assert_close(y.feats, ref[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]])
    # every occupied parent and nothing else
    occupied = (x.dense().abs().sum(1) > 0).double()
    parents = F.max_pool3d(occupied[:, None], 2)[:, 0].nonzero()
    assert parents.shape[0] == y.num_voxels


def test_downsample_mean_and_subdivide():
    x = _random_sparse([50, 3], resolution=8, channels=2)
    d = sp.sparse_downsample(x, 2)
    dense = x.dense()
    occ = (torch.zeros_like(dense[:, :1]) + 1)
    occ = (dense.abs().sum(1, keepdim=True) > 0).float()
    ref = F.avg_pool3d(dense, 2) / F.avg_pool3d(occ, 2).clamp(min=1e-12)
    c = d.coords.long()
    torch.testing.assert_close(d.feats, ref[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]])
    u = sp.sparse_subdivide(d)
    assert u.num_voxels == 8 * d.num_voxels and u.resolution == 8
    sp.SparseTensor(u.feats, u.coords, resolution=8)  # valid: no duplicates, batch-sorted


def test_group_norm_matches_per_sample_torch():
    x = _random_sparse([20, 0, 7], resolution=8, channels=8)
    gn = sp.SparseGroupNorm(4, 8)
    with torch.no_grad():
        gn.weight.uniform_()
        gn.bias.uniform_()
    y = gn(x)
    ref = torch.nn.GroupNorm(4, 8)
    ref.load_state_dict(gn.state_dict())
    for b, part in enumerate(x.unbind()):
        if part.num_voxels == 0:
            continue
        lo, hi = x.cu_seqlens[b].item(), x.cu_seqlens[b + 1].item()
        expect = ref(part.feats.T[None])[0].T
        torch.testing.assert_close(y.feats[lo:hi], expect, atol=1e-5, rtol=1e-5)

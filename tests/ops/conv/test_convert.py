"""Weight converters: a converted weight gives the same output as F.conv3d on the scattered dense grid."""

import pytest
import torch
import torch.nn.functional as F

from d3s2.ops.conv import sparse_conv
from d3s2.ops.conv.convert import from_conv3d, from_spconv, from_torchsparse, to_conv3d, to_spconv, to_torchsparse

from .dense import conv_case, random_sparse


def _active(dense_out, coords):
    c = coords.long()
    return dense_out[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]]


@pytest.fixture
def case():
    x = random_sparse([25, 0, 1, 12], 5, 3)
    x = x.replace(x.feats.double())
    kmap, coords, weight, bias = conv_case(x, 4, stride=1)
    return x, kmap, weight, bias


def test_conv3d_roundtrip_and_output(case):
    x, kmap, weight, bias = case
    torch_w = torch.randn(4, 3, 3, 3, 3, dtype=torch.float64)
    w = from_conv3d(torch_w)
    assert torch.equal(to_conv3d(w), torch_w)
    ref = _active(F.conv3d(x.dense(), torch_w, bias, padding=1), x.coords)
    torch.testing.assert_close(sparse_conv(x.feats, kmap, w, bias, backend="torch"), ref)


@pytest.mark.parametrize("index_order", ["xyz", "zyx"])
def test_spconv_layout(case, index_order):
    """spconv's conv equals F.conv3d(weight.permute(0, 4, 1, 2, 3)) on the grid in its index-column order."""
    x, kmap, _, bias = case
    sp_w = torch.randn(4, 3, 3, 3, 3, dtype=torch.float64)  # [C_out, a0, a1, a2, C_in]
    w = from_spconv(sp_w, index_order)
    assert torch.equal(to_spconv(w, index_order), sp_w)
    grid = x.dense() if index_order == "xyz" else x.dense().permute(0, 1, 4, 3, 2)  # axes in index order
    out = F.conv3d(grid, sp_w.permute(0, 4, 1, 2, 3), bias, padding=1)
    if index_order == "zyx":
        out = out.permute(0, 1, 4, 3, 2)  # back to [B, C, X, Y, Z]
    torch.testing.assert_close(sparse_conv(x.feats, kmap, w, bias, backend="torch"), _active(out, x.coords))


def test_torchsparse_is_identity_and_1x1_is_2d(case):
    x, kmap, weight, bias = case
    assert from_torchsparse(weight) is weight and to_torchsparse(weight) is weight
    w1 = torch.randn(3, 4, dtype=torch.float64)
    assert from_torchsparse(w1).shape == (1, 3, 4) and torch.equal(to_torchsparse(from_torchsparse(w1)), w1)
    ref = _active(F.conv3d(x.dense(), to_conv3d(from_torchsparse(w1)), bias), x.coords)
    torch.testing.assert_close(x.feats @ w1 + bias, ref)


def test_down_conv_layout_matches_strided_conv3d():
    x = random_sparse([40, 0, 9], 8, 2)
    x = x.replace(x.feats.double())
    kmap, coords, weight, bias = conv_case(x, 3, stride=2)
    ref = _active(F.conv3d(x.dense(), to_conv3d(weight), bias, stride=2), coords)
    torch.testing.assert_close(sparse_conv(x.feats, kmap, weight, bias, backend="torch"), ref)


def test_converters_reject_bad_shapes():
    with pytest.raises(ValueError, match="cubic"):
        to_conv3d(torch.zeros(26, 2, 2))
    with pytest.raises(ValueError, match="index_order"):
        from_spconv(torch.zeros(2, 3, 3, 3, 2), "yxz")
    with pytest.raises(ValueError, match="F.conv3d"):
        from_conv3d(torch.zeros(2, 2, 3, 3))

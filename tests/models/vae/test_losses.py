import pytest
import torch

from d3s2 import sparse as sp
from d3s2.models.vae import DiagonalGaussian, SDFLossWeights, sparse_sdf_loss


def _toy():
    # 4 target voxels (one sample, R=4): two band, two extra; voxel 0 is also sharp.
    coords = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0]], dtype=torch.int32)
    target = sp.SparseTensor(torch.tensor([[0.5], [-0.25], [1.0], [-1.0]]), coords, resolution=4)
    in_band = torch.tensor([True, True, False, False])
    sharp = torch.tensor([True, False, False, False])
    return coords, target, in_band, sharp


def test_loss_terms_on_a_toy_example():
    coords, target, in_band, sharp = _toy()
    # decoded in a different order, plus one voxel without a target (ignored)
    dec_coords = torch.cat([coords[[3, 1, 0, 2]], torch.tensor([[0, 3, 3, 3]], dtype=torch.int32)])
    dec = sp.SparseTensor(torch.tensor([[-0.5], [0.25], [0.0], [1.0], [0.7]]), dec_coords, resolution=4)
    post = DiagonalGaussian(torch.zeros(3, 4), dim=1)  # mean 0, logvar 0: KL = 0
    w = SDFLossWeights(in_band=1.0, ext=0.1, sharp=2.0, kl=1e-3)
    loss, logs = sparse_sdf_loss(dec, target, in_band, sharp, post, w)
    l_in = ((0.0 - 0.5) ** 2 + (0.25 + 0.25) ** 2) / 2
    l_ext = ((1.0 - 1.0) ** 2 + (-0.5 + 1.0) ** 2) / 2
    l_sharp = (0.0 - 0.5) ** 2
    assert logs["l_in"].item() == pytest.approx(l_in)
    assert logs["l_ext"].item() == pytest.approx(l_ext)
    assert logs["l_sharp"].item() == pytest.approx(l_sharp)
    assert logs["kl"].item() == pytest.approx(0.0)
    assert loss.item() == pytest.approx(l_in + 0.1 * l_ext + 2.0 * l_sharp)
    assert logs["supervised"].item() == 4


def test_kl_of_a_known_gaussian():
    mean = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, 2.0]])
    post = DiagonalGaussian(torch.cat([mean, logvar], 1), dim=1)
    expect = 0.5 * ((1.0 + 1.0 - 1.0 - 0.0) + (0.0 + torch.e**2 - 1.0 - 2.0)) / 2
    assert post.kl().item() == pytest.approx(expect, rel=1e-6)
    assert DiagonalGaussian(torch.tensor([[0.0, 100.0]]), dim=1).logvar.item() == 20.0  # clamped


def test_empty_sets_contribute_zero_and_keep_gradients():
    coords, target, in_band, sharp = _toy()
    feats = torch.zeros(1, 1, requires_grad=True)
    dec = sp.SparseTensor(feats, coords[2:3], resolution=4)  # one extra voxel only
    loss, logs = sparse_sdf_loss(dec, target, in_band, sharp, DiagonalGaussian(torch.zeros(1, 2)),
                                 SDFLossWeights())
    assert logs["l_in"] == 0 and logs["l_sharp"] == 0 and logs["l_ext"].item() == pytest.approx(1.0)
    loss.backward()
    assert feats.grad.item() == pytest.approx(0.1 * 2 * (0.0 - 1.0))


def test_loss_validates_inputs():
    coords, target, in_band, sharp = _toy()
    with pytest.raises(ValueError, match="resolution"):
        sparse_sdf_loss(sp.SparseTensor(torch.zeros(4, 1), coords, resolution=8), target, in_band, sharp,
                        DiagonalGaussian(torch.zeros(1, 2)), SDFLossWeights())
    with pytest.raises(ValueError, match="in_band and sharp"):
        sparse_sdf_loss(target, target, in_band[:2], sharp, DiagonalGaussian(torch.zeros(1, 2)), SDFLossWeights())

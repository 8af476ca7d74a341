import math

import pytest
import torch

from d3s2.models.embeddings import AbsolutePositionEmbedder, TimestepEmbedder, timestep_embedding


def test_ape_layout_matches_published_dense_dit_pos_emb():
    # Published dense DiT: C=1024, 170 freqs 1/10000^(i/170), [sin|cos] per axis x, y, z, 4 zero channels.
    ape = AbsolutePositionEmbedder(1024)
    coords = torch.tensor([[3, 5, 7], [0, 0, 0], [15, 1, 2]])
    e = ape(coords)
    assert e.shape == (3, 1024) and e.dtype == torch.float32
    for row, (x, y, z) in enumerate(coords.tolist()):
        for axis, p in enumerate((x, y, z)):
            base = axis * 340
            for i in (0, 1, 84, 169):
                f = 1.0 / 10000 ** (i / 170)
                assert e[row, base + i].item() == pytest.approx(math.sin(p * f), abs=1e-5)
                assert e[row, base + 170 + i].item() == pytest.approx(math.cos(p * f), abs=1e-5)
    assert (e[:, 1020:] == 0).all()


def test_ape_factor_scales_coordinates():
    ape = AbsolutePositionEmbedder(96, factor=0.5)
    c = torch.randint(0, 128, (10, 3))
    assert torch.allclose(ape(c), AbsolutePositionEmbedder(96)(c.float() * 0.5))
    assert torch.allclose(ape(c, factor=1.0), AbsolutePositionEmbedder(96)(c))


def test_ape_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expected coords of shape"):
        AbsolutePositionEmbedder(64)(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="expected channels"):
        AbsolutePositionEmbedder(4)


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 1.0, 500.0, 999.0])
    e = timestep_embedding(t, 256)
    for row, tv in enumerate(t.tolist()):
        for i in (0, 7, 127):
            f = math.exp(-math.log(10000.0) * i / 128)
            assert e[row, i].item() == pytest.approx(math.cos(tv * f), abs=1e-4)
            assert e[row, 128 + i].item() == pytest.approx(math.sin(tv * f), abs=1e-4)


def test_timestep_embedder_shapes_and_keys():
    m = TimestepEmbedder(64)
    assert m(torch.rand(5) * 1000).shape == (5, 64)
    assert set(m.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
    assert m.mlp[0].weight.shape == (64, 256)

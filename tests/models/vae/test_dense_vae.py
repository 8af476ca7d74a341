import pytest
import torch

from d3s2.models.vae.dense_vae import DenseShapeVAE, DenseShapeVAEConfig, pixel_shuffle_3d


def tiny_dense_config() -> DenseShapeVAEConfig:
    """Same values as configs/debug/tiny_dense_vae.yaml."""
    return DenseShapeVAEConfig(latent_channels=4, encoder_channels=[8, 16, 32], num_res_blocks_encoder=1,
                               num_res_blocks_middle_encoder=1, decoder_channels=[32, 16, 8],
                               num_res_blocks_decoder=1, num_res_blocks_middle_decoder=1)


def _ball(edge: int = 16, radius: float = 5.0) -> torch.Tensor:
    g = torch.stack(torch.meshgrid(*[torch.arange(edge)] * 3, indexing="ij"), 0).float() + 0.5
    return (torch.linalg.norm(g - edge / 2, dim=0) < radius)[None, None]  # [1, 1, S, S, S] bool


def test_shapes_grads_and_loss():
    torch.manual_seed(0)
    model = DenseShapeVAE(tiny_dense_config())
    occ = torch.cat([_ball(), _ball(radius=3.0)])
    out = model(occ)
    assert out.latent.shape == (2, 4, 4, 4, 4) and out.logits.shape == (2, 1, 16, 16, 16)
    loss, logs = model.loss(out, occ)
    loss.backward()
    assert torch.isfinite(loss) and set(logs) == {"loss", "bce", "dice", "kl"}
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_overfits_one_ball():
    torch.manual_seed(0)
    model = DenseShapeVAE(tiny_dense_config())
    occ = _ball(8, 2.8)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    first = None
    for _ in range(30):
        loss, logs = model.loss(model(occ), occ)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    model.eval()
    with torch.no_grad():
        coords = model.occupied_coords(model(occ).logits, threshold=0.5)
    truth = torch.nonzero(occ[:, 0]).to(torch.int32)
    inter = (coords[:, None, :] == truth[None, :, :]).all(-1).any(1).sum().item()
    iou = inter / (coords.shape[0] + truth.shape[0] - inter)
    assert iou > 0.95, iou


def test_pixel_shuffle_layout():
    # channel c·8 + i·4 + j·2 + k goes to sub-position (i, j, k)
    x = torch.arange(16, dtype=torch.float32).view(1, 16, 1, 1, 1)
    y = pixel_shuffle_3d(x, 2)
    assert y.shape == (1, 2, 2, 2, 2)
    for c in range(2):
        for i in range(2):
            for j in range(2):
                for k in range(2):
                    assert y[0, c, i, j, k] == c * 8 + i * 4 + j * 2 + k


def test_occupied_coords_threshold():
    logits = torch.full((1, 1, 4, 4, 4), -10.0)
    logits[0, 0, 1, 2, 3] = 0.0
    assert DenseShapeVAE.occupied_coords(logits).tolist() == [[0, 1, 2, 3]]


def test_input_validation():
    model = DenseShapeVAE(tiny_dense_config())
    with pytest.raises(ValueError, match="expected occupancy"):
        model.encode(torch.zeros(1, 1, 15, 15, 15))
    with pytest.raises(ValueError, match="expected latent"):
        model.decode(torch.zeros(1, 3, 4, 4, 4))

"""The tiny SS-VAE learns one small shape (sphere SDF band at R=16) on CPU in a few seconds."""

import torch

from d3s2.models.vae import SparseSDFVAE
from tests.models.vae._cases import sphere_batch, tiny_config


def test_tiny_sparse_vae_overfits_a_sphere():
    torch.manual_seed(0)
    model = SparseSDFVAE(tiny_config())
    batch = sphere_batch(16, radii=(5.0,), tau=2.0, sharp_every=4)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    history = []
    for _ in range(50):
        loss, logs = model.loss(model(batch), batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(logs)
    first, last = history[0], history[-1]
    assert last["loss"] < 0.15 * first["loss"], (first, last)
    model.eval()
    with torch.no_grad():
        out = model(batch)
        _, logs = model.loss(out, batch)
    assert logs["l_in"] < 0.04 and logs["l_ext"] < 0.04, logs
    # the decoded zero level set is in the right place: band voxels get the right sign
    from d3s2.ops.conv.reference import lookup

    row = lookup(batch.target.coords, out.decoded.coords, 16).long()
    band = batch.in_band[row] & (batch.target.feats[row, 0].abs() > 0.25)
    agree = (out.decoded.feats[band, 0] > 0) == (batch.target.feats[row][band, 0] > 0)
    assert agree.float().mean() > 0.95, agree.float().mean()

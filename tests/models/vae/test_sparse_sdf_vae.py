import pytest
import torch

from d3s2 import sparse as sp
from d3s2.models.vae import PackedSDFBatch, SparseSDFBatch, SparseSDFVAE
from d3s2.models.vae.transformer import SparseWindowSelfAttention
from tests.models.vae._cases import random_latent, sphere_batch, sphere_sample, tiny_config, with_inside_bits


def _keyed(x: sp.SparseTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by (b, x, y, z): comparable across orderings."""
    r = x.resolution
    c = x.coords.long()
    order = torch.argsort(((c[:, 0] * r + c[:, 1]) * r + c[:, 2]) * r + c[:, 3])
    return x.coords[order], x.feats[order]


def test_shapes_and_finite_grads():
    torch.manual_seed(0)
    model = SparseSDFVAE(tiny_config())
    batch = sphere_batch(16, radii=(5.0, 3.5), sharp_every=5)
    out = model(batch)
    nl = out.latent.num_voxels
    assert out.latent.resolution == 2 and out.latent.num_channels == 8 and out.latent.batch_size == 2
    assert out.posterior.mean.shape == (nl, 8) and out.posterior.logvar.shape == (nl, 8)
    assert out.decoded.num_voxels == 512 * nl and out.decoded.resolution == 16
    assert out.decoded.feats.abs().max() <= 1
    # decoded voxels = every voxel of the occupied blocks = the target set
    assert torch.equal(_keyed(out.decoded)[0], _keyed(batch.target)[0])
    loss, logs = model.loss(out, batch)
    loss.backward()
    assert torch.isfinite(loss) and logs["supervised"] == batch.target.num_voxels
    assert logs["l_sharp"] > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # every parameter gets some gradient signal except through the zero-initialised head
    assert model.decoder.out_layer.weight.grad.abs().sum() > 0


def test_encoder_downsamples_by_8_and_keeps_blocks():
    model = SparseSDFVAE(tiny_config())
    batch = sphere_batch(32, radii=(5.0,))
    z, _ = model.encode(batch.sdf, sample_posterior=False)
    expect = torch.unique(batch.sdf.coords[:, 1:] // 8, dim=0)
    assert torch.equal(_keyed(z)[0][:, 1:], expect.to(torch.int32))


def _batch_with_a_closure_block() -> SparseSDFBatch:
    """A sphere whose occupied blocks include one without band voxels (as the data's band-closing blocks)."""
    from tests.models.vae._cases import sphere_sdf

    coords, sdf, blocks, _ = sphere_sample(32, 5.0)
    blocks = torch.cat([blocks, torch.tensor([[3, 3, 3]])])  # far from the sphere: no band voxel in it
    local = torch.stack(torch.meshgrid(*[torch.arange(8)] * 3, indexing="ij"), -1).reshape(-1, 3)
    block_sdf = sphere_sdf((blocks[:, None] * 8 + local).reshape(-1, 3), 32, 5.0, 2.0).clamp(-1, 1).reshape(-1, 512)
    return SparseSDFBatch.from_samples([coords], [sdf], [blocks], [block_sdf], resolution=32)


def test_latents_cover_every_occupied_block():
    batch = _batch_with_a_closure_block()
    blocks = batch.block_structure()
    band_blocks = torch.unique(batch.sdf.coords[:, 1:] // 8, dim=0).to(torch.int32)
    assert blocks.num_voxels == band_blocks.shape[0] + 1 and blocks.resolution == 4
    assert torch.equal(blocks.coords, _block_structure_of(batch.target))  # the blocks' runs of target rows
    torch.manual_seed(0)
    model = SparseSDFVAE(tiny_config())
    out = model(batch)
    assert torch.equal(_keyed(out.latent)[0], _keyed(blocks)[0])  # one latent per occupied block, the extra one too
    assert out.decoded.num_voxels == batch.target.num_voxels  # every target voxel is decoded and supervised
    _, logs = model.loss(out, batch)
    assert int(logs["supervised"]) == batch.target.num_voxels
    z, _ = model.encode(batch.sdf, sample_posterior=False)  # without a structure: the band's blocks
    assert torch.equal(_keyed(z)[0][:, 1:], band_blocks)

    torch.manual_seed(0)
    published = SparseSDFVAE(tiny_config(latent_structure="band"))  # the published encoder ignores the structure
    assert torch.equal(_keyed(published(batch).latent)[0][:, 1:], band_blocks)
    with pytest.raises(ValueError, match="latent_structure"):
        tiny_config(latent_structure="all")


def _block_structure_of(target: sp.SparseTensor) -> torch.Tensor:
    """coords ``[NB, 4]`` (b, block) of the runs of ``target`` rows that share a block, in order."""
    return torch.unique_consecutive(torch.cat([target.coords[:, :1], target.coords[:, 1:] // 8], 1), dim=0)


def test_seeded_determinism():
    def run():
        torch.manual_seed(123)
        model = SparseSDFVAE(tiny_config())
        out = model(sphere_batch(16))
        return out.decoded.feats, out.latent.feats
    (d1, z1), (d2, z2) = run(), run()
    assert torch.equal(d1, d2) and torch.equal(z1, z2)


def test_eval_mode_uses_posterior_mode():
    model = SparseSDFVAE(tiny_config()).eval()
    batch = sphere_batch(16)
    out = model(batch)
    assert torch.equal(out.latent.feats, out.posterior.mean)


def test_window_attention_matches_dense_masked_attention():
    torch.manual_seed(0)
    attn = SparseWindowSelfAttention(16, 2, window_size=4, shift=2)
    x = random_latent([30, 12], resolution=10, channels=16)
    h = torch.randn(x.num_voxels, 16)
    out = attn(x, h)
    # brute force: full attention per sample, masked to tokens of the same shifted window
    qkv = attn.to_qkv(h).view(-1, 3, 2, 8)
    win = torch.cat([x.coords[:, :1], (x.coords[:, 1:] + 2) // 4], 1)
    same = (win[:, None, :] == win[None, :, :]).all(-1)  # [N, N]
    q, k, v = qkv.unbind(1)
    scores = torch.einsum("ihd,jhd->hij", q, k) / 8**0.5
    p = scores.masked_fill(~same, float("-inf")).softmax(-1)
    ref = attn.to_out(torch.einsum("hij,jhd->ihd", p, v).reshape(-1, 16))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _blob_latent() -> sp.SparseTensor:
    # Clustered around the chunk corner at 8 on a 16³ latent grid, so every 8³ chunk cuts through it.
    return random_latent([9, 5], resolution=16, channels=8, box=(6, 10))


def test_chunked_decode_equals_unchunked():
    torch.manual_seed(0)
    model = SparseSDFVAE(tiny_config(chunk_padding=3)).eval()
    torch.nn.init.normal_(model.decoder.out_layer.weight, std=0.5)  # a non-trivial head
    z = _blob_latent()
    with torch.no_grad():
        full = model.decode(z)
        chunked = model.decode(z, chunk_size=8)
    assert torch.equal(chunked.coords, full.coords)  # same voxels in the same order
    torch.testing.assert_close(chunked.feats, full.feats, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [0, 8])
def test_return_feat_is_the_pre_head_path(chunk_size):
    """``return_feat`` gives the upsample blocks' output (the refiner's input) in the rows of the SDF; the SDF is
    ``tanh(out_layer(feats))`` and equals a plain decode, chunked or not."""
    torch.manual_seed(0)
    model = SparseSDFVAE(tiny_config(chunk_padding=3)).eval()
    torch.nn.init.normal_(model.decoder.out_layer.weight, std=0.5)
    z = _blob_latent()
    with torch.no_grad():
        plain = model.decode(z, chunk_size=chunk_size)
        sdf, feats = model.decode(z, chunk_size=chunk_size, return_feat=True)
        h = model.decoder.trunk(z)
        for block in model.decoder.upsample:
            h = block(h)
    assert feats.shape == (sdf.num_voxels, tiny_config().up_channels[-1]) and sdf.num_channels == 1
    assert torch.equal(sdf.coords, plain.coords)
    torch.testing.assert_close(sdf.feats, plain.feats, rtol=1e-5, atol=1e-6)
    _, want = _keyed(h)
    _, got = _keyed(sdf.replace(feats))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sdf.feats, torch.tanh(model.decoder.out_layer(feats)), rtol=1e-5, atol=1e-6)


def test_chunked_decode_needs_the_halo():
    torch.manual_seed(0)
    model = SparseSDFVAE(tiny_config(chunk_padding=0)).eval()
    torch.nn.init.normal_(model.decoder.out_layer.weight, std=0.5)
    z = _blob_latent()
    with torch.no_grad():
        full, chunked = model.decode(z), model.decode(z, chunk_size=8)
    assert torch.equal(chunked.coords, full.coords)
    assert not torch.allclose(chunked.feats, full.feats, atol=1e-4)


def test_random_chunk_training_decode_is_a_subset_of_the_full_decode():
    torch.manual_seed(0)
    model = SparseSDFVAE(tiny_config(train_chunk_size=2, chunk_padding=3)).train()
    torch.nn.init.normal_(model.decoder.out_layer.weight, std=0.5)
    z = _blob_latent()
    part = model.decode_random_chunk(z, 2, generator=torch.Generator().manual_seed(1))
    full = model.decode(z)
    assert 0 < part.num_voxels < full.num_voxels and part.num_voxels % 512 == 0
    blocks = part.coords[:, 1:] // 8
    assert int((blocks.max(0).values - blocks.min(0).values).max()) < 2  # one 2³-latent box
    fc, ff = _keyed(full)
    pc, pf = _keyed(part)
    keys = lambda c: ((c[:, 0].long() * 128 + c[:, 1]) * 128 + c[:, 2]) * 128 + c[:, 3]  # noqa: E731
    rows = torch.searchsorted(keys(fc), keys(pc))
    assert torch.equal(fc[rows], pc)
    torch.testing.assert_close(pf, ff[rows], rtol=1e-5, atol=1e-6)


def test_forward_with_train_chunk_trains_on_the_chunk():
    torch.manual_seed(0)
    model = SparseSDFVAE(tiny_config(train_chunk_size=1)).train()
    batch = sphere_batch(32, radii=(5.0,))
    out = model(batch)
    assert out.decoded.num_voxels == 512  # one latent voxel per 1³ box
    loss, logs = model.loss(out, batch)
    loss.backward()
    assert logs["supervised"] == 512


def test_batch_from_samples_masks_and_errors():
    coords, sdf, blocks, block_sdf = sphere_sample(16, 5.0)
    batch = SparseSDFBatch.from_samples([coords], [sdf], [blocks], [block_sdf], resolution=16,
                                        sharp=[torch.arange(coords.shape[0]) < 3])
    assert int(batch.in_band.sum()) == coords.shape[0] and int(batch.sharp.sum()) == 3
    # band targets equal the band input values (same analytic SDF)
    torch.testing.assert_close(torch.sort(batch.target.feats[batch.in_band, 0]).values,
                               torch.sort(sdf).values)
    with pytest.raises(ValueError, match="outside the given blocks"):
        SparseSDFBatch.from_samples([coords], [sdf], [blocks[:1]], [block_sdf[:1]], resolution=16)
    with pytest.raises(ValueError, match="expected block_sdf of shape"):
        SparseSDFBatch.from_samples([coords], [sdf], [blocks], [block_sdf[:, :8]], resolution=16)


def test_input_validation():
    model = SparseSDFVAE(tiny_config())
    x = random_latent([5], resolution=16, channels=2)
    with pytest.raises(ValueError, match="expected one SDF channel"):
        model.encode(x)
    with pytest.raises(ValueError, match="expected 8 latent channels"):
        model.decode(x)
    with pytest.raises(ValueError, match="not divisible by num_groups"):
        tiny_config(down_channels=[8, 10, 16])


def test_batch_from_blocks_normalises_by_tau():
    # the layout of d3s2.data.collate_sparse: world-unit SDF, blocks at R/8 with 512 columns (z fastest)
    coords, sdf, blocks, block_sdf = sphere_sample(16, 5.0, tau=1.0)  # SDF in voxel units
    x = sp.SparseTensor.from_samples([coords.to(torch.int32)], [sdf[:, None]], resolution=16)
    bl = sp.SparseTensor.from_samples([blocks.to(torch.int32)], [block_sdf * 3.0], resolution=2)
    batch = SparseSDFBatch.from_blocks(x, bl, tau=2.0)
    torch.testing.assert_close(batch.sdf.feats, sdf[:, None] / 2.0)
    assert batch.target.feats.abs().max() <= 1.0
    # voxel (bx·8 + lx, ...) holds column (lx·8 + ly)·8 + lz of its block
    row = 5 * 512 + (3 * 8 + 1) * 8 + 6
    b = blocks[5]
    assert batch.target.coords[row].tolist() == [0, int(b[0]) * 8 + 3, int(b[1]) * 8 + 1, int(b[2]) * 8 + 6]
    assert batch.target.feats[row, 0] == (block_sdf[5, row - 5 * 512] * 3.0 / 2.0).clamp(-1, 1)
    with pytest.raises(ValueError, match="expected blocks"):
        SparseSDFBatch.from_blocks(x, bl.replace(bl.feats[:, :8]))


def test_prepared_structure_same_result_and_no_host_syncs(monkeypatch):
    """Structure built in the collate (prepare_structure) gives the same loss and gradients, and the model's
    forward, loss and backward then run no op that would block the host on a GPU."""
    import d3s2.models.vae.transformer as transformer
    from d3s2.models.vae.sparse_sdf_vae import prepare_structure
    from tests._sync_ops import SyncOps

    # The reference attention reads window bounds on the host (the triton kernel does not): stand it in.
    monkeypatch.setattr(transformer, "window_attention", lambda q, k, v, off: v * torch.sigmoid(q + k))

    def run(prepare: bool):
        torch.manual_seed(0)
        model = SparseSDFVAE(tiny_config())
        batch = sphere_batch(32, radii=(9.0, 11.0))
        if prepare:
            prepare_structure(batch.sdf, model.config.window_size, structure=batch.block_structure())
        with SyncOps() as syncs:
            out = model(batch)
            loss, _ = model.loss(out, batch)
            loss.backward()
        return loss, [p.grad.clone() for p in model.parameters() if p.grad is not None], syncs.counts

    loss_a, grads_a, syncs_a = run(False)
    loss_b, grads_b, syncs_b = run(True)
    assert sum(syncs_a.values()) > 0  # the counter sees the unprepared structure's unique/partition ops
    assert not syncs_b, dict(syncs_b)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_inside_bits_expand_to_the_same_batch():
    packed = sphere_batch(16, radii=(5.0, 6.5), sharp_every=3, packed=True)
    bits = with_inside_bits(packed)
    assert bits.blocks.num_channels == 0 and bits.inside.shape == (packed.blocks.num_voxels, 64)
    got, ref = bits.unpack(), packed.unpack()
    assert torch.equal(got.target.coords, ref.target.coords) and torch.equal(got.target.feats, ref.target.feats)
    assert torch.equal(got.in_band, ref.in_band) and torch.equal(got.sharp, ref.sharp)
    assert torch.equal(got.sdf.feats, ref.sdf.feats)
    with pytest.raises(ValueError, match="inside"):
        PackedSDFBatch.from_inside_bits(bits.sdf, bits.blocks, bits.rows, bits.inside[1:], bits.fill)


@pytest.mark.gpu
@pytest.mark.parametrize("inside_bits", [False, True])
def test_training_step_runs_without_host_syncs_on_gpu(inside_bits):
    """On CUDA with the triton backends: a prepared, pinned, packed batch (as the DataLoader workers hand it over)
    moved without blocking and expanded on the GPU, then forward, loss and backward under
    ``set_sync_debug_mode("error")`` (any host sync raises)."""
    from d3s2.models.vae.sparse_sdf_vae import prepare_structure
    from d3s2.ops._backend import use_backend

    torch.manual_seed(0)
    model = SparseSDFVAE(tiny_config()).cuda()

    def step() -> None:
        batch = sphere_batch(32, radii=(9.0, 11.0), sharp_every=3, packed=True)
        if inside_bits:
            batch = with_inside_bits(batch)
        prepare_structure(batch.sdf, model.config.window_size, structure=batch.blocks)  # as SparseVAETask.collate
        batch = batch.pin_memory().to("cuda", non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch)
            loss, _ = model.loss(out, batch)
        loss.backward()

    with use_backend("conv", "triton"), use_backend("block_attn", "triton"):
        step()  # compiles the kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()

import pytest
import torch

from d3s2.models.attention import map_published_ssa_state_dict
from d3s2.models.dit import ConditionTokens, SparseDiT
from d3s2.sparse import SparseTensor

from .common import PUBLISHED, perturb, published_keys, random_cond, random_sparse, tiny_sparse

SSA_ONLY = ("intra_block_pe", "gate.", "compression_")


def _published_factory(version):
    return SparseDiT.Config.v1_1 if version == "v1.1" else SparseDiT.Config.v1_0


@pytest.mark.parametrize("version", ["v1.1", "v1.0"])
def test_full_config_with_ssa_matches_published_state_dict(version):
    """Every published key (torchsparse conv names mapped by the SSA helper) with its shape, and the count."""
    cfg = _published_factory(version)(512)
    pub = PUBLISHED[f"sparse_dit_{version}"]
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.compression_block_size, cfg.selection_block_size, cfg.topk,
            cfg.compression_version, cfg.sparse_conditions, cfg.resolution) == tuple(pub["config"][k] for k in (
            "num_heads", "num_kv_heads", "compression_block_size", "selection_block_size", "topk",
            "compression_version", "sparse_conditions", "resolution"))
    with torch.device("meta"):
        model = SparseDiT(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    published = {k: torch.empty(s, device="meta") for k, s in published_keys(f"sparse_dit_{version}").items()}
    expected = {k: tuple(v.shape) for k, v in map_published_ssa_state_dict(published).items()}
    assert ours == expected
    outside_ssa = [k for k in expected if not any(part in k for part in SSA_ONLY)]
    assert [k for k in ours if not any(part in k for part in SSA_ONLY)] == outside_ssa  # same order
    assert sum(p.numel() for p in model.parameters()) == pub["params"]


@pytest.mark.parametrize("version", ["v1.1", "v1.0"])
def test_full_attention_shares_published_layout_outside_ssa(version):
    """With full attention the model has every published key except SSA's own (gate, compression, PE)."""
    with torch.device("meta"):
        model = SparseDiT(_published_factory(version)(512, attention="full"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {k: s for k, s in published_keys(f"sparse_dit_{version}").items()
                if not any(part in k for part in SSA_ONLY)}
    assert list(ours) == list(expected) and ours == expected


def test_tiny_ssa_model_trains_and_is_per_sample():
    model = tiny_sparse(attention="ssa", compression_block_size=2, selection_block_size=4, topk=2, window_size=4)
    perturb(model)
    x, t, cond = random_sparse(counts=(20, 7), resolution=8), torch.tensor([5.0, 700.0]), random_cond(2)
    out = model(x, t, cond)
    out.feats.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.no_grad():
        for b, xb in enumerate(x.unbind()):
            one = model(xb, t[b:b + 1], ConditionTokens(cond.tokens[b:b + 1]))
            torch.testing.assert_close(one.feats, out.feats[x.cu_seqlens[b]:x.cu_seqlens[b + 1]].detach(),
                                       rtol=1e-4, atol=1e-5)


def test_published_1024_uses_half_coordinate_factor():
    assert SparseDiT.Config.v1_1(1024).pe_factor == 0.5 and SparseDiT.Config.v1_1(1024).resolution == 128
    assert SparseDiT.Config.v1_0(1024).topk == 8 and SparseDiT.Config.v1_0(512).topk == 32
    with pytest.raises(ValueError, match="512 or 1024"):
        SparseDiT.Config.v1_1(256)


def test_forward_zero_init_grads_and_structure():
    model = tiny_sparse()
    x, t, cond = random_sparse(), torch.tensor([5.0, 700.0]), random_cond(2)
    out = model(x, t, cond)
    assert isinstance(out, SparseTensor) and torch.equal(out.coords, x.coords) and out.feats.shape == (14, 4)
    assert torch.count_nonzero(out.feats) == 0
    perturb(model)
    model(x, t, cond).feats.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_ragged_batch_equals_per_sample_and_is_deterministic():
    model = tiny_sparse()
    perturb(model)
    x, t, cond = random_sparse(counts=(5, 1, 9)), torch.tensor([5.0, 300.0, 700.0]), random_cond(3)
    with torch.no_grad():
        full = model(x, t, cond)
        for b, xb in enumerate(x.unbind()):
            one = model(xb, t[b:b + 1], ConditionTokens(cond.tokens[b:b + 1]))
            torch.testing.assert_close(one.feats, full.feats[x.cu_seqlens[b]:x.cu_seqlens[b + 1]],
                                       rtol=1e-5, atol=1e-6)
        assert torch.equal(model(x, t, cond).feats, full.feats)


def test_pe_factor_changes_position_code():
    a, b = tiny_sparse(), tiny_sparse(pe_factor=0.5)
    perturb(a)
    b.load_state_dict(a.state_dict())
    x, t, cond = random_sparse(), torch.tensor([5.0, 700.0]), random_cond(2)
    with torch.no_grad():
        assert not torch.allclose(a(x, t, cond).feats, b(x, t, cond).feats)
        doubled = SparseTensor(x.feats, torch.cat([x.coords[:, :1], x.coords[:, 1:] * 2], 1), resolution=16)
        torch.testing.assert_close(b(doubled, t, cond).feats, a(x, t, cond).feats, rtol=1e-4, atol=1e-5)


def test_sparse_conditions_ignore_padding():
    model = tiny_sparse(sparse_conditions=True)
    assert model.cond_proj.weight.shape == (24, 24)
    perturb(model)
    x, t = random_sparse(), torch.tensor([5.0, 700.0])
    tokens = torch.randn(2, 6, 24)
    coords = torch.randint(0, 5, (2, 6, 3))
    lengths = torch.tensor([4, 6])
    mask = torch.arange(6)[None] < lengths[:, None]
    cond = ConditionTokens(tokens, mask, coords)
    garbage = ConditionTokens(torch.where(mask[..., None], tokens, 1e3), mask, coords)
    with torch.no_grad():
        out = model(x, t, cond)
        torch.testing.assert_close(model(x, t, garbage).feats, out.feats)
        first = model(x.unbind()[0], t[:1], ConditionTokens(tokens[:1, :4], mask[:1, :4], coords[:1, :4]))
        torch.testing.assert_close(first.feats, out.feats[:5], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sparse conditions"):
        model(x, t, random_cond(2))


def test_custom_attention_factory_and_errors():
    calls = []

    def factory(cfg, index):
        calls.append(index)
        from d3s2.models.dit.blocks import SparseFullAttention
        return SparseFullAttention(cfg.model_channels, cfg.num_heads)
    model = SparseDiT(
        SparseDiT.Config(resolution=8, in_channels=4, out_channels=4, model_channels=32, cond_channels=24,
                         num_blocks=3, num_heads=4), self_attention=factory)
    assert calls == [0, 1, 2] and model.blocks[0].self_attn.num_kv_heads == 4
    with pytest.raises(ValueError, match="expected attention"):
        tiny_sparse(attention="linear")
    with pytest.raises(ValueError, match="input channels"):
        tiny_sparse()(random_sparse(channels=3), torch.zeros(2), random_cond(2))


def test_guided_sampling_batched_equals_two_passes():
    from d3s2.flow import euler_sigmas, randn_like_latent, sample_euler

    model = tiny_sparse(sparse_conditions=True).eval()
    perturb(model)
    x = random_sparse(counts=(6, 3))
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    cond = ConditionTokens(torch.randn(2, 6, 24), mask, torch.randint(0, 4, (2, 6, 3)))
    noise = randn_like_latent(x, torch.Generator().manual_seed(2))
    out = sample_euler(model, noise, cond=cond, uncond=cond.zeros_like(), steps=3, guidance_scale=4.0, shift=3.0)
    ref = noise.feats.clone()
    sig = euler_sigmas(3, shift=3.0)
    with torch.no_grad():
        for i in range(3):
            t = torch.full((2,), float(sig[i]) * 1000)
            vc = model(noise.replace(ref), t, cond).feats
            vu = model(noise.replace(ref), t, cond.zeros_like()).feats
            ref = ref + float(sig[i + 1] - sig[i]) * (vu + 4.0 * (vc - vu))
    torch.testing.assert_close(out.feats, ref, rtol=1e-4, atol=1e-5)


def test_safetensors_roundtrip(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_sparse(attention="ssa", compression_block_size=2, selection_block_size=4, topk=2, window_size=4,
                        sparse_conditions=True)
    perturb(model)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    other = tiny_sparse(attention="ssa", compression_block_size=2, selection_block_size=4, topk=2, window_size=4,
                        sparse_conditions=True)
    other.load_state_dict(load_file(tmp_path / "model.safetensors"))
    x, t = random_sparse(), torch.tensor([5.0, 700.0])
    cond = ConditionTokens(torch.randn(2, 4, 24), torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 4, 3))
    with torch.no_grad():
        assert torch.equal(other(x, t, cond).feats, model(x, t, cond).feats)


@pytest.mark.parametrize("sparse_conditions", [False, True])
def test_prepared_condition_gives_the_same_velocity(sparse_conditions):
    model = tiny_sparse(sparse_conditions=sparse_conditions)
    perturb(model)
    x, t = random_sparse(counts=(5, 9)), torch.tensor([5.0, 700.0])
    cond = ConditionTokens(torch.randn(2, 6, 24), torch.tensor([[True] * 4 + [False] * 2, [True] * 6]),
                           torch.randint(0, 4, (2, 6, 3))) if sparse_conditions else random_cond(2)
    with torch.no_grad():
        prepared = model.prepare_condition(cond)
        assert torch.equal(model(x, t, prepared).feats, model(x, t, cond).feats)
        with pytest.raises(ValueError, match="another model"):
            tiny_sparse(sparse_conditions=sparse_conditions)(x, t, prepared)

import pytest
import torch

from d3s2.models.dit import ConditionTokens, DenseDiT

from .common import PUBLISHED, perturb, published_keys, random_cond, tiny_dense


def test_full_config_state_dict_matches_published_layout():
    with torch.device("meta"):
        model = DenseDiT()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = published_keys("dense_dit")
    assert list(ours) == list(expected)  # same keys in the same order
    assert ours == expected
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED["dense_dit"]["params"]


def test_pos_emb_is_published_3d_sincos_table():
    model = tiny_dense(resolution=4, model_channels=32)  # 32 // 3 // 2 = 5 freqs per axis, 2 zero channels
    f = 1.0 / 10000 ** (torch.arange(5, dtype=torch.float32) / 5)
    x, y, z = 1, 2, 3
    row = model.pos_emb[16 * x + 4 * y + z]
    expected = torch.cat([torch.sin(x * f), torch.cos(x * f), torch.sin(y * f), torch.cos(y * f),
                          torch.sin(z * f), torch.cos(z * f), torch.zeros(2)])
    torch.testing.assert_close(row, expected)
    assert "pos_emb" in model.state_dict()


def test_forward_shapes_zero_init_and_grads():
    model = tiny_dense()
    x, t, cond = torch.randn(2, 3, 4, 4, 4), torch.tensor([10.0, 900.0]), random_cond(2)
    out = model(x, t, cond)
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # zero-initialised output layer
    perturb(model)
    out = model(x, t, cond.tokens)  # a plain tensor is dense conditioning
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.blocks[0].cross_attn.to_kv.weight.grad.abs().sum() > 0


def test_batch_items_are_independent_and_deterministic():
    torch.manual_seed(0)
    a = tiny_dense()
    torch.manual_seed(0)
    b = tiny_dense()
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)
    perturb(a)
    x, t, cond = torch.randn(3, 3, 4, 4, 4), torch.tensor([1.0, 500.0, 999.0]), random_cond(3)
    with torch.no_grad():
        full = a(x, t, cond)
        for i in range(3):
            one = a(x[i:i + 1], t[i:i + 1], ConditionTokens(cond.tokens[i:i + 1]))
            torch.testing.assert_close(one, full[i:i + 1], rtol=1e-5, atol=1e-6)
        assert torch.equal(a(x, t, cond), full)
        changed = a(x, t, ConditionTokens(cond.tokens * 2))
    assert not torch.allclose(changed, full)  # the condition matters


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = tiny_dense()
    perturb(model)
    ckpt = tiny_dense(use_checkpoint=True)
    ckpt.load_state_dict(model.state_dict())
    x, t, cond = torch.randn(2, 3, 4, 4, 4), torch.tensor([3.0, 300.0]), random_cond(2)
    model(x, t, cond).sum().backward()
    ckpt.train()
    ckpt(x, t, cond).sum().backward()
    for (n, p), q in zip(model.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_safetensors_roundtrip_and_bf16(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_dense()
    perturb(model)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    other = tiny_dense()
    other.load_state_dict(load_file(tmp_path / "model.safetensors"))
    x, t, cond = torch.randn(1, 3, 4, 4, 4), torch.tensor([250.0]), random_cond(1)
    with torch.no_grad():
        torch.testing.assert_close(other(x, t, cond), model(x, t, cond))
        low = model.to(torch.bfloat16)(x, t, cond)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()


def test_clear_errors():
    model = tiny_dense()
    with pytest.raises(ValueError, match=r"expected x of shape \[B, 3, 4, 4, 4\]"):
        model(torch.randn(1, 3, 5, 5, 5), torch.zeros(1), random_cond(1))
    with pytest.raises(ValueError, match="expected t of shape"):
        model(torch.randn(1, 3, 4, 4, 4), torch.zeros(2), random_cond(1))
    with pytest.raises(ValueError, match="expected condition tokens"):
        model(torch.randn(1, 3, 4, 4, 4), torch.zeros(1), random_cond(1, channels=8))


def test_prepared_condition_gives_the_same_velocity_and_belongs_to_its_model():
    from d3s2.models.dit import PreparedCondition

    model, other = tiny_dense(), tiny_dense()
    perturb(model)
    x, t, cond = torch.randn(2, 3, 4, 4, 4), torch.tensor([1.0, 700.0]), random_cond(2)
    with torch.no_grad():
        prepared = model.prepare_condition(cond)
        assert isinstance(prepared, PreparedCondition) and len(prepared.kv) == len(model.blocks)
        assert torch.equal(model(x, t, prepared), model(x, t, cond))
        with pytest.raises(ValueError, match="another model"):
            other(x, t, prepared)


def test_prepared_cfg_pair_marks_the_zero_condition_constant_and_matches():
    model = tiny_dense()
    perturb(model)
    x, t = torch.randn(2, 3, 4, 4, 4), torch.tensor([700.0, 700.0])
    cond = random_cond(1)
    pair = ConditionTokens.cat([cond, cond.zeros_like()])
    with torch.no_grad():
        prepared = model.prepare_condition(pair)
        assert prepared.constant == (False, True)
        torch.testing.assert_close(model(x, t, prepared), model(x, t, pair), rtol=1e-5, atol=1e-6)

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from d3s2.config import PACKAGED_CONFIGS
from d3s2.models.registry import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    build_model,
    from_pretrained,
    model_config,
    model_names,
    register_model,
    save_pretrained,
)
from d3s2.models.vae import SparseSDFVAE
from d3s2.models.vae.dense_vae import DenseShapeVAE
from d3s2.ops._backend import use_backend
from tests.models.vae._cases import random_latent

CONFIGS = PACKAGED_CONFIGS


def _model_section(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["model"]


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = _model_section(CONFIGS / "debug" / "tiny_vae.yaml")
    model = build_model(cfg["name"], cfg["args"])
    torch.nn.init.normal_(model.decoder.out_layer.weight)  # non-trivial output
    save_pretrained(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp files
    loaded = from_pretrained(tmp_path / "m")
    assert isinstance(loaded, SparseSDFVAE) and not loaded.training
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    z = random_latent([3], resolution=4, channels=8)
    # torch reference ops: other test modules may have set TRITON_INTERPRET=1 process-wide
    with torch.no_grad(), use_backend("conv", "torch"), use_backend("block_attn", "torch"):
        assert torch.equal(model.eval().decode(z).feats, loaded.decode(z).feats)


def test_save_fp16_and_load(tmp_path):
    cfg = _model_section(CONFIGS / "debug" / "tiny_dense_vae.yaml")
    model = build_model(cfg["name"], cfg["args"])
    save_pretrained(model, tmp_path, dtype=torch.float16)
    payload = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert payload["name"] == "dense_shape_vae" and payload["config"]["latent_channels"] == 4
    loaded = from_pretrained(tmp_path)
    assert isinstance(loaded, DenseShapeVAE)
    w = loaded.encoder.input_layer.weight
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, model.encoder.input_layer.weight.half().float())


# Model configs only: *_train.yaml files are run configs without a model section.
_VAE_CONFIGS = sorted((CONFIGS / "vae").glob("*.yaml")) + sorted((CONFIGS / "debug").glob("*vae.yaml"))


@pytest.mark.parametrize("path", _VAE_CONFIGS, ids=lambda p: p.name)
def test_configs_build(path):
    cfg = _model_section(path)
    with torch.device("meta"):
        model = build_model(cfg["name"], cfg["args"])
    assert sum(p.numel() for p in model.parameters()) > 0


def test_full_configs_are_the_published_architectures():
    with torch.device("meta"):
        ss = build_model("sparse_sdf_vae", _model_section(CONFIGS / "vae" / "ss_vae_512.yaml")["args"])
        dense = build_model("dense_shape_vae", _model_section(CONFIGS / "vae" / "dense_vae.yaml")["args"])
    assert sum(p.numel() for p in ss.parameters()) == 37_874_113
    assert sum(p.numel() for p in dense.parameters()) == 193_037_009


def test_strict_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nope")
    with pytest.raises(ValueError, match=r"unknown keys \['latent_dim'\]"):
        build_model("sparse_sdf_vae", {"latent_dim": 4})
    with pytest.raises(ValueError, match=r"sparse_sdf_vae.loss: unknown keys \['l1'\]"):
        build_model("sparse_sdf_vae", {"loss": {"l1": 1.0}})
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("name,args,message", [
    ("sparse_sdf_vae", {"num_blocks": "2"}, "model.args.num_blocks: expected int, got str ('2')"),
    ("sparse_sdf_vae", {"latent_channels": 8.0}, "model.args.latent_channels: expected int, got float (8.0)"),
    ("sparse_sdf_vae", {"mlp_ratio": "2.0"}, "model.args.mlp_ratio: expected float, got str ('2.0')"),
    ("sparse_sdf_vae", {"num_heads": True}, "model.args.num_heads: expected int, got bool (True)"),
    ("sparse_sdf_vae", {"down_channels": [8, "16", 16]}, "model.args.down_channels[1]: expected int, got str ('16')"),
    ("sparse_sdf_vae", {"loss": {"kl": "small"}}, "model.args.loss.kl: expected float, got str ('small')"),
    ("sparse_sdf_vae", {"loss": "small"}, "model.args.loss: expected a mapping for SDFLossWeights, got str"),
    ("dense_shape_vae", {"loss": {"dice": "1"}}, "model.args.loss.dice: expected float, got str ('1')"),
    ("sparse_dit", {"use_shift": "yes"}, "model.args.use_shift: expected bool, got str ('yes')"),
    ("small_image_encoder", {"image_size": "28"}, "model.args.image_size: expected int, got str ('28')"),
])
def test_config_values_of_the_wrong_type_are_clear_errors(name, args, message):
    with pytest.raises(ValueError) as err:
        model_config(name, args, "model.args")
    assert str(err.value) == message
    with pytest.raises(ValueError, match=f"^{name}[.]"):  # build_model checks the same, naming the model
        build_model(name, args)


def test_config_ints_are_accepted_for_floats():
    cfg = model_config("sparse_sdf_vae", {"mlp_ratio": 2, "loss": {"kl": 0}})
    assert cfg.mlp_ratio == 2.0 and isinstance(cfg.mlp_ratio, float) and isinstance(cfg.loss.kl, float)


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_a_damaged_weights_file_is_a_clear_error(tmp_path, damage):
    cfg = _model_section(CONFIGS / "debug" / "tiny_dense_vae.yaml")
    save_pretrained(build_model(cfg["name"], cfg["args"]), tmp_path)
    weights = tmp_path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000] if damage == "truncated" else random.Random(0).randbytes(5000))
    with pytest.raises(ValueError, match="not a valid safetensors file") as err:
        from_pretrained(tmp_path)
    assert str(weights) in str(err.value)


@pytest.mark.parametrize("text,message", [("{", "not valid JSON"),
                                          ("[1, 2]", "expected keys 'name' and 'config', got list")])
def test_a_damaged_config_file_is_a_clear_error(tmp_path, text, message):
    (tmp_path / CONFIG_FILE).write_text(text)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(ValueError, match=message) as err:
        from_pretrained(tmp_path)
    assert str(tmp_path / CONFIG_FILE) in str(err.value)


def test_register_model():
    assert {"sparse_sdf_vae", "dense_shape_vae"} <= set(model_names())
    with pytest.raises(ValueError, match="already registered"):
        register_model("sparse_sdf_vae")(SparseSDFVAE)

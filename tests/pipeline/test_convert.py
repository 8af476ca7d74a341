"""`d3s2 convert`: a (tiny) published-format folder → d3s2 config.json + safetensors, read back identically."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml

from d3s2.cli import main
from d3s2.pipeline import published as pub

from .synthetic import EXTRA_CONFIG

TINY = {
    "dense_dit": {"target": "direct3d_s2.models.transformers.dense_dit.DenseDiT", "params": {
        "resolution": 4, "in_channels": 8, "out_channels": 8, "model_channels": 32, "cond_channels": 24,
        "num_blocks": 1, "num_heads": 2, "mlp_ratio": 4, "patch_size": 1, "pe_mode": "ape", "qk_rms_norm": True,
        "use_checkpoint": True, "use_fp16": True, "latent_shape": [8, 4, 4, 4]}},
    "sparse_vae_512": {"target": "direct3d_s2.models.autoencoders.ss_vae_legacy.SparseSDFVAE", "params": {
        "use_checkpoint": True, "embed_dim": 16, "num_head_channels_encoder": 32, "model_channels_encoder": 64,
        "num_heads_encoder": 2, "num_blocks_encoder": 1, "num_head_channels_decoder": 32,
        "model_channels_decoder": 64, "num_heads_decoder": 2, "num_blocks_decoder": 1, "resolution": 64,
        "out_channels": 1, "use_fp16": True, "latents_scale": 1.0, "latents_shift": 0.0}},
    "sparse_dit_512": {"target": "direct3d_s2.models.transformers.sparse_dit.SparseDiT", "params": {
        "resolution": 16, "in_channels": 16, "out_channels": 16, "model_channels": 64, "cond_channels": 24,
        "num_blocks": 2, "num_heads": 4, "num_kv_heads": 2, "compression_block_size": 4,
        "selection_block_size": 8, "topk": 2, "compression_version": "v2", "pe_mode": "ape", "factor": 1.0,
        "sparse_conditions": True, "qk_rms_norm": True, "use_shift": True, "use_checkpoint": True,
        "use_fp16": True}},
}


@pytest.fixture()
def tiny_folder(tmp_path):
    """A published-format folder of tiny models (random weights written in the published names/layouts)."""
    root = tmp_path / "published"
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump({**TINY, **EXTRA_CONFIG}))
    g = torch.Generator().manual_seed(0)
    files: dict[str, dict] = {}
    models = {}
    for name, entry in TINY.items():
        model = pub.build_component(name, entry)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        models[name] = model
        file, key = pub.CHECKPOINTS[name]
        files.setdefault(file, {})[key] = {k: v.half() for k, v in pub.to_published(model).items()}
    for file, payload in files.items():
        torch.save(payload, root / file)
    return root, models


def test_convert_cli_writes_registry_folders_that_read_back(tiny_folder, tmp_path, caplog):
    root, models = tiny_folder
    out = tmp_path / "converted"
    with caplog.at_level(logging.INFO):
        assert main(["convert", str(root), "--out", str(out)]) == 0
    assert f"wrote {out}" in caplog.text
    manifest = json.loads((out / "pipeline.json").read_text())
    assert manifest["components"] == ["dense_dit", "sparse_vae_512", "sparse_dit_512"]
    assert manifest["version"] == "v1.0" and manifest["defaults"]["sparse_512"]["shift"] == 6.0
    assert sorted(p.name for p in out.iterdir()) == ["dense_dit", "pipeline.json", "sparse_dit_512",
                                                       "sparse_vae_512"]
    for name in TINY:
        assert sorted(p.name for p in (out / name).iterdir()) == ["config.json", "model.safetensors"]
    back = pub.load_converted(out)
    assert back.defaults == pub.read_defaults(pub.read_config(root))
    for name, model in models.items():
        got = back[name].state_dict()
        for key, value in model.state_dict().items():
            assert got[key].dtype == torch.float32  # registry models load in their construction dtype
            assert torch.equal(got[key], value.half().float()), (name, key)  # stored fp16, kept exactly
    # Converting again replaces the folders atomically (no leftovers).
    assert main(["convert", str(root), "--out", str(out), "--components", "dense_dit", "--dtype", "float32"]) == 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_convert_cli_reports_errors(tiny_folder, tmp_path, capsys):
    root, _ = tiny_folder
    torch.save({"dit": {"x": torch.zeros(1)}, "vae": {"y": torch.zeros(1)}}, root / "model_sparse_512.ckpt")
    assert main(["convert", str(root), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "d3s2 convert: error:" in err and "unexpected y" in err and "missing" in err
    assert main(["convert", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 1
    assert "config.yaml" in capsys.readouterr().err
    with pytest.raises(ValueError, match="other than the published folder"):
        pub.convert_published(root, root)


def test_convert_refuses_a_folder_without_checkpoints_and_writes_nothing(tmp_path, capsys):
    root = tmp_path / "published"
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump({**TINY, **EXTRA_CONFIG}))  # the checkpoints not downloaded
    out = tmp_path / "converted"
    assert main(["convert", str(root), "--out", str(out)]) == 1
    assert "no model_*.ckpt file of a configured component found" in capsys.readouterr().err
    assert main(["convert", str(root), "--out", str(out), "--components", "sparse_dit_512"]) == 1
    assert "expected checkpoint file(s) ['model_sparse_512.ckpt']" in capsys.readouterr().err
    assert main(["convert", str(root), "--out", str(out), "--components", "vae"]) == 1
    assert "unknown components ['vae']" in capsys.readouterr().err
    assert not out.exists()  # no empty pipeline folder that `d3s2 generate` would fail on later


def test_a_failed_conversion_leaves_no_partial_folder_and_an_earlier_one_as_it_was(tiny_folder, tmp_path, capsys):
    root, _ = tiny_folder
    sparse = root / "model_sparse_512.ckpt"
    good = sparse.read_bytes()
    sparse.write_bytes(good[: len(good) // 2])  # converted after model_dense.ckpt: the dense DiT is done by then
    out = tmp_path / "converted"
    assert main(["convert", str(root), "--out", str(out)]) == 1
    assert "model_sparse_512.ckpt: cannot read the checkpoint" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".converted*"))

    sparse.write_bytes(good)
    assert main(["convert", str(root), "--out", str(out), "--components", "sparse_vae_512", "sparse_dit_512"]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    sparse.write_bytes(good[: len(good) // 2])
    assert main(["convert", str(root), "--out", str(out)]) == 1
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not list(tmp_path.glob(".converted*"))


def test_convert_refuses_to_replace_a_folder_it_did_not_write(tiny_folder, tmp_path, capsys):
    root, _ = tiny_folder
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert main(["convert", str(root), "--out", str(out)]) == 1
    assert "expected --out to be a new or empty folder, or one written by d3s2 convert" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_convert_writes_checkpoint_tensors_that_share_memory(tiny_folder, tmp_path):
    root, models = tiny_folder
    name = "dense_dit"
    file, key = pub.CHECKPOINTS[name]
    shapes = {k: v.shape for k, v in pub.to_published(models[name]).items()}
    # Overlapping windows of one buffer (as tied weights, or synthetic files as tests/pipeline/synthetic.py
    # writes them): safetensors refuses to save tensors that share memory.
    buffer = torch.randn(max(s.numel() for s in shapes.values()) + len(shapes))
    views = {k: buffer[i:i + s.numel()].view(s) for i, (k, s) in enumerate(shapes.items())}
    torch.save({key: views}, root / file)
    out = tmp_path / "converted"
    assert main(["convert", str(root), "--out", str(out), "--components", name]) == 0
    got = pub.load_converted(out)[name].state_dict()
    for k, v in views.items():
        assert torch.equal(got[k], v), k


def test_convert_refuses_to_replace_a_pipeline_folder_it_did_not_write(tiny_folder, tmp_path, capsys):
    from .tiny import tiny_pipeline

    root, _ = tiny_folder
    own = tiny_pipeline().save_pretrained(tmp_path / "my_pipeline")  # also a pipeline.json, but trained weights
    before = {p.relative_to(own): p.read_bytes() for p in own.rglob("*") if p.is_file()}
    assert main(["convert", str(root), "--out", str(own)]) == 1
    assert "written by d3s2 convert" in capsys.readouterr().err
    assert {p.relative_to(own): p.read_bytes() for p in own.rglob("*") if p.is_file()} == before

"""Our VAE state dicts vs the published Direct3D-S2 checkpoints' keys and shapes (fixture from
published-state-dicts.json, v1.1)."""

import json
from pathlib import Path

import torch

from d3s2.models.vae import SparseSDFVAE
from d3s2.models.vae.dense_vae import DenseShapeVAE
from d3s2.models.vae.published import (
    sparse_conv_module_names,
    sparse_vae_from_published,
    sparse_vae_to_published,
)

LAYOUT = json.loads((Path(__file__).parent / "assets" / "published_vae_layout.json").read_text())


def _meta(cls):
    with torch.device("meta"):
        return cls()


def test_sparse_vae_matches_published_layout_up_to_conv_renames():
    model = _meta(SparseSDFVAE)
    pub = LAYOUT["sparse_vae_512"]
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == pub["params"] == 37_874_113
    # published -> ours: every key and shape lands exactly (empty tensors of the published shapes)
    converted = sparse_vae_from_published({k: torch.empty(s, device="meta") for k, s in pub["state_dict"].items()})
    assert {k: tuple(v.shape) for k, v in converted.items()} == ours
    # ours -> published is the inverse, key order included
    back = sparse_vae_to_published(model.state_dict(), sparse_conv_module_names(model))
    assert list(back) == list(pub["state_dict"])
    assert all(list(v.shape) == pub["state_dict"][k] for k, v in back.items())
    assert len(sparse_conv_module_names(model)) == 15  # 9 encoder (3 of them 1×1 skips) + 6 decoder


def test_published_sparse_vae_state_dict_loads_strictly():
    full = _meta(SparseSDFVAE)
    pub = {k: torch.zeros(s, device="meta") for k, s in LAYOUT["sparse_vae_512"]["state_dict"].items()}
    missing, unexpected = full.load_state_dict(sparse_vae_from_published(pub), strict=True, assign=True)
    assert not missing and not unexpected


def test_dense_vae_matches_published_layout_exactly():
    model = _meta(DenseShapeVAE)
    pub = LAYOUT["dense_vae"]
    assert sum(p.numel() for p in model.parameters()) == pub["params"] == 193_037_009
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == list(pub["state_dict"].items())

"""The shipped DiT configs build the published models; the tiny ones run image → condition → guided sampling."""


import numpy as np
import pytest
import torch
import yaml

from d3s2.config import PACKAGED_CONFIGS
from d3s2.flow import randn_like_latent, sample_euler
from d3s2.models.conditioner import SmallImageEncoder, preprocess_image
from d3s2.models.dit import DenseDiT, SparseDiT
from d3s2.sparse import SparseTensor

from .common import PUBLISHED, random_sparse

CONFIGS = PACKAGED_CONFIGS
MODELS = {"dense_dit": DenseDiT, "sparse_dit": SparseDiT}


def _load(rel: str) -> dict:
    return yaml.safe_load((CONFIGS / rel).read_text())


def _build(cfg: dict) -> torch.nn.Module:
    cls = MODELS[cfg["model"]["name"]]
    return cls(cls.Config(**cfg["model"]["args"]))


@pytest.mark.parametrize("rel,published", [("dit/dense_dit.yaml", "dense_dit"),
                                           ("dit/sparse_dit_512.yaml", "sparse_dit_v1.1"),
                                           ("dit/sparse_dit_1024.yaml", "sparse_dit_v1.1"),
                                           ("dit/sparse_dit_512_v1_0.yaml", "sparse_dit_v1.0")])
def test_full_configs_build_published_models(rel, published):
    with torch.device("meta"):
        model = _build(_load(rel))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[published]["params"]


def _image() -> np.ndarray:
    img = np.zeros((64, 64, 4), np.uint8)
    img[16:48, 20:44] = (30, 160, 90, 255)
    return img


def _condition(cfg: dict):
    enc = SmallImageEncoder(SmallImageEncoder.Config(**cfg["conditioner"]["args"]))
    prep = preprocess_image(_image(), size=enc.image_size, border=2)
    with torch.no_grad():
        return enc.condition(prep.rgb[None], prep.mask[None], sparse=cfg["conditioner"]["sparse"])


def test_tiny_dense_config_guided_sampling_from_an_image():
    cfg = _load("debug/tiny_dit_dense.yaml")
    model = _build(cfg).eval()
    cond = _condition(cfg)
    s = cfg["sampler"]
    a = model.config
    noise = randn_like_latent(torch.empty(1, a.in_channels, a.resolution, a.resolution, a.resolution),
                              torch.Generator().manual_seed(0))
    out = sample_euler(model, noise, cond=cond, uncond=cond.zeros_like(), steps=s["steps"],
                       guidance_scale=s["guidance_scale"], shift=s["shift"])
    assert out.shape == noise.shape and torch.isfinite(out).all()


def test_tiny_sparse_config_guided_sampling_from_an_image():
    cfg = _load("debug/tiny_dit_sparse.yaml")
    model = _build(cfg).eval()
    cond = _condition(cfg)
    assert cond.mask is not None and int(cond.mask.sum()) < cond.tokens.shape[1] + 1
    s = cfg["sampler"]
    x = random_sparse(counts=(40,), channels=model.config.in_channels, resolution=model.config.resolution)
    noise = randn_like_latent(x, torch.Generator().manual_seed(0))
    out = sample_euler(model, noise, cond=cond, uncond=cond.zeros_like(), steps=s["steps"],
                       guidance_scale=s["guidance_scale"], shift=s["shift"])
    assert isinstance(out, SparseTensor) and out.feats.shape == (40, 16) and torch.isfinite(out.feats).all()

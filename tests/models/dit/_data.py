"""The tiny encoded fixture: a 32³ build of the five 0 A.D. test assets with renders, a random SS-VAE, its latents."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from d3s2.cli import main
from d3s2.config import PACKAGED_CONFIGS as CONFIGS
from d3s2.config import load_yaml
from d3s2.data.build import BuildConfig, build, resolve_sources
from d3s2.models.registry import build_model, save_pretrained

ROOT = Path(__file__).resolve().parents[3]
TINY_CORPUS = ROOT / "tests" / "assets" / "0ad_tiny.npz"
RESOLUTION = 32
BAND = 0.0625


def random_vae_export(out: Path, seed: int = 0) -> Path:
    """The tiny SS-VAE, randomly initialised, then perturbed so that its decoder's output crosses zero."""
    torch.manual_seed(seed)
    vae = build_model("sparse_sdf_vae", load_yaml(CONFIGS / "debug/tiny_vae.yaml")["model"]["args"])
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_pretrained(vae, out)
    (out / "vae_task.json").write_text(json.dumps({"band": BAND, "resolutions": [RESOLUTION]}))
    return out


def build_encoded(root: Path) -> tuple[Path, Path, Path]:
    data = root / "data"
    summary = build(resolve_sources(["0ad"], corpus_path=str(TINY_CORPUS)), data,
                    BuildConfig(resolutions=(RESOLUTION,), views=2, image_size=32, band=BAND), progress=False)
    assert summary.built == 5 and not summary.failed, summary
    vae = random_vae_export(root / "vae")
    latents = root / "latents"
    assert main(["data", "encode", "--data", str(data), "--vae", str(vae), "--resolution", str(RESOLUTION),
                 "--out", str(latents), "--no-progress"]) == 0
    return data, vae, latents

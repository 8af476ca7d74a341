"""Synthetic published Direct3D-S2 folders: the exact keys, shapes and dtypes of the real checkpoints (from the
committed fixture tests/assets/published_state_dicts.json.gz) with random values, in the published file layout."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import torch
import yaml

ASSET = Path(__file__).resolve().parents[1] / "assets" / "published_state_dicts.json.gz"
PUBLISHED = json.loads(gzip.decompress(ASSET.read_bytes()))
VERSIONS = ("v1.0", "v1.1")
DTYPES = {"float16": torch.float16, "float32": torch.float32}

# Entries of the published config.yaml that carry no weights (values from the published configs).
EXTRA_CONFIG = {
    "dense_scheduler": {"target": "diffusers.schedulers.FlowMatchEulerDiscreteScheduler",
                        "params": {"num_train_timesteps": 1000, "shift": 6.0}},
    "sparse_scheduler_512": {"target": "diffusers.schedulers.FlowMatchEulerDiscreteScheduler",
                             "params": {"num_train_timesteps": 1000, "shift": 6.0}},
    "sparse_scheduler_1024": {"target": "diffusers.schedulers.FlowMatchEulerDiscreteScheduler",
                              "params": {"num_train_timesteps": 1000, "shift": 8.0}},
    "dense_image_encoder": {"target": "direct3d_s2.models.conditioner.DinoEncoder",
                            "params": {"model": "facebookresearch/dinov2", "version": "dinov2_vitl14_reg",
                                       "size": 518}},
    "sparse_image_encoder": {"target": "direct3d_s2.models.conditioner.DinoEncoder",
                             "params": {"model": "facebookresearch/dinov2", "version": "dinov2_vitl14_reg",
                                        "size": 518}},
}


def entries(version: str, component: str) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(k, tuple(s), DTYPES[t]) for k, s, t in PUBLISHED[version][component]["state_dict"]]


def published_config(version: str) -> dict:
    cfg = {c: {"target": x["class"], "params": dict(x["config"])} for c, x in PUBLISHED[version].items()}
    return {**cfg, **EXTRA_CONFIG}


def reference_ape(xyz: torch.Tensor, channels: int = 1024) -> torch.Tensor:
    """The published sinusoidal APE written independently of d3s2 from the fixture notes: per axis
    C//3//2 frequencies 1/10000^(i/F), [sin | cos]; axes x, y, z concatenated; zero padding to C."""
    nf = channels // 3 // 2
    freqs = 1.0 / 10000 ** (torch.arange(nf, dtype=torch.float64) / nf)
    xyz = xyz.double()
    parts = [f(xyz[:, a:a + 1] * freqs) for a in range(3) for f in (torch.sin, torch.cos)]
    emb = torch.cat(parts, 1).float()
    return torch.cat([emb, emb.new_zeros(emb.shape[0], channels - emb.shape[1])], 1)


def reference_pos_emb(resolution: int = 16, channels: int = 1024) -> torch.Tensor:
    """The dense DiT's stored table: row 256x + 16y + z holds the APE of (x, y, z)."""
    row = torch.arange(resolution**3)
    return reference_ape(torch.stack([row // resolution**2, row // resolution % resolution, row % resolution], 1),
                         channels)


_POS_EMB: dict[int, torch.Tensor] = {}


def random_state_dict(spec: list[tuple[str, tuple[int, ...], torch.dtype]], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors of the given keys/shapes/dtypes. Tensors of one dtype are windows (at random offsets) of
    one shared random storage, so a file of a 500 M-parameter model stays as small as its largest tensor."""
    g = torch.Generator().manual_seed(seed)
    slack = 4099
    bases = {}
    for dtype in {d for _, _, d in spec}:
        n = max(math.prod(s) for _, s, d in spec if d == dtype) + slack
        # A random period of 2^20 + 7 values repeated: cheap to make, and windows at random offsets still differ.
        period = (torch.randn(2**20 + 7, generator=g) * 0.05).to(dtype)
        bases[dtype] = period.repeat(-(-n // period.numel()))[:n]
    out = {}
    for key, shape, dtype in spec:
        if key == "pos_emb":
            if shape[0] not in _POS_EMB:
                _POS_EMB[shape[0]] = reference_pos_emb(round(shape[0] ** (1 / 3)), shape[1])
            out[key] = _POS_EMB[shape[0]].to(dtype)
            continue
        off = int(torch.randint(slack, (1,), generator=g))
        out[key] = bases[dtype][off:off + math.prod(shape)].view(shape)
    return out


def write_published_folder(root: Path, version: str, components=None, seed: int = 0) -> Path:
    """A published folder (config.yaml + model_*.ckpt) with the components whose names are given (default all)."""
    root.mkdir(parents=True, exist_ok=True)
    names = [c for c in PUBLISHED[version] if components is None or c in components]
    (root / "config.yaml").write_text(yaml.safe_dump(published_config(version), sort_keys=False))
    files: dict[str, dict] = {}
    for i, c in enumerate(names):
        x = PUBLISHED[version][c]
        files.setdefault(x["file"], {})[x["key"]] = random_state_dict(entries(version, c), seed + i)
    for file, payload in files.items():
        torch.save(payload, root / file)
    return root

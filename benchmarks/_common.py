"""Helpers shared by the end-to-end benchmarks (bench_published, bench_vae, bench_generate): environment facts,
latent layouts, CUDA peak memory and atomic JSON / Markdown output."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DEFAULT_LAYOUTS = "/work/shared/data/latent_layouts_1024.npz"
GIB = 2**30


def environment(device: str) -> dict[str, Any]:
    """Device name, library versions, git commit and UTC date."""
    dev = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": dev, "torch": torch.__version__, "triton": triton_version, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def load_layouts(path: str | os.PathLike, key: str, resolutions: list[int], top: int = 1024) -> dict[int, torch.Tensor]:
    """Latent coords int32 ``[N, 3]`` per mesh resolution from a ``latent_layouts_1024.npz`` entry (coords of the
    ``top / 8`` latent grid): resolution r gets the unique ``coords // (top / r)``."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"layouts file not found: {p} (pass --layouts; see /work/shared/data/README.md)")
    with np.load(p) as data:
        if key not in data:
            raise SystemExit(f"{p}: no layout {key!r}; expected one of {sorted(data.keys())}")
        coords = torch.from_numpy(data[key].astype(np.int32))
    out = {}
    for r in resolutions:
        if top % r:
            raise SystemExit(f"resolution {r} does not divide the layout resolution {top}")
        f = top // r
        out[r] = torch.unique(torch.div(coords, f, rounding_mode="floor"), dim=0) if f > 1 else coords
    return out


def random_dino(device: str) -> tuple[torch.nn.Module, str]:
    """A random DINOv2 ViT-L/14-reg4 at 518² built on ``device`` (transformers), or, without transformers, d3s2's
    small encoder at the same size (width 1024, 24 blocks, 16 heads, 1374 tokens). Returns (module, what)."""
    from d3s2.models.conditioner import DinoV2Encoder, SmallImageEncoder

    with torch.device(device):  # random init on the GPU: no minutes of CPU init for 300 M parameters
        try:
            return DinoV2Encoder.random(), "DINOv2 ViT-L/14-reg4 (transformers, random)"
        except ImportError:
            cfg = SmallImageEncoder.Config(image_size=518, patch_size=14, width=1024, depth=24, num_heads=16,
                                           mlp_ratio=4.0, num_register_tokens=4)
            return SmallImageEncoder(cfg), "ViT-L-sized SmallImageEncoder (transformers missing)"


def tiny_shell_layouts(pipe) -> dict[int, torch.Tensor]:
    """A ball shell per tiny resolution (stands in for a layouts file in --tiny runs)."""
    out = {}
    for r in pipe.resolutions:
        g = r // 8
        ax = torch.arange(g)
        c = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
        d = ((c.float() + 0.5) / g * 2 - 1).norm(dim=1)
        out[r] = c[(d - 0.6).abs() < 1.5 / g].to(torch.int32)
    return out


def rgba_disc(size: int = 512) -> np.ndarray:
    """uint8 ``[size, size, 4]``: an opaque disc on a transparent background (no background removal needed)."""
    img = np.zeros((size, size, 4), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.35 * size) ** 2] = (180, 120, 60, 255)
    return img


class Meter:
    """Seconds (CUDA-synchronised) and CUDA peak allocated GiB of named blocks: ``with meter("encode"): ...``."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.device = device
        self.rows: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[dict[str, float]]:
        row: dict[str, float] = {}
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            row["start_gib"] = round(torch.cuda.memory_allocated(self.device) / GIB, 3)
        t0 = time.perf_counter()
        yield row
        if self.cuda:
            torch.cuda.synchronize(self.device)
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / GIB, 3)
        row["seconds"] = round(time.perf_counter() - t0, 3)
        self.rows[name] = row


def write_outputs(out_dir: str | os.PathLike, stem: str, result: dict, markdown: str) -> list[Path]:
    """``<stem>.json`` and ``<stem>.md`` in ``out_dir``, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in ((".json", json.dumps(result, indent=2) + "\n"), (".md", markdown)):
        path = out / f"{stem}{suffix}"
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def default_out_dir() -> str:
    """``$OUT`` when set (the device machine's result folder), else benchmarks/results."""
    return os.environ.get("OUT") or str(ROOT / "benchmarks" / "results")


def gib(n_bytes: float) -> float:
    return round(n_bytes / GIB, 3)

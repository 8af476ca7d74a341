"""``d3s2 data encode``: every asset of a built data folder → its SS-VAE posterior (the DiTs' training latents).

Output folder layout (a fixed format; GPU scripts write it too)::

    ENC/encoded.json        {"format": "d3s2-latents", "resolution": R, "latent_resolution": R // 8,
                             "channels": C, "band": τ, "vae": <the VAE folder as given>, "vae_sha256": <SHA-256
                             of its model.safetensors> (absent in folders written before it: not checked),
                             "refine_steps": N (absent in folders written before it: 0), "refine_lr": lr (when N > 0)}
    ENC/assets/<name>.npz   coords int16 [n, 3] latent-grid coords sorted lexicographically (x, y, z),
                            mean float16 [n, C], logvar float16 [n, C]

Every asset file is written atomically, and a re-run skips assets whose file exists (settings and VAE weights must
match: a VAE retrained into the same folder is another VAE).
The encoder sees SDF / τ of the build's band voxels, exactly as in VAE training (:mod:`d3s2.models.vae.task`), with
τ the VAE's band (its ``vae_task.json``; :mod:`d3s2.models.vae.export_info`): a folder built with a band more than 2x
from it is refused, and a band or resolution the VAE was not trained with is warned about.
With ``refine_steps > 0`` the stored ``mean`` is the encoder's posterior mode refined by that many Adam steps
against the decoder's loss on the asset's own targets (:func:`d3s2.models.vae.refine.refine_latent`, semi-amortised
encoding); ``logvar`` stays the encoder's.

Dimension legend: N band voxels, n latent voxels, C latent channels.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .build import asset_path, open_asset, remove_stale_temps, write_npz_atomic

FORMAT = "d3s2-latents"
SETTINGS_FILE = "encoded.json"


@dataclass
class EncodeSummary:
    encoded: int = 0
    skipped: int = 0  # already done
    seconds: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)


def read_settings(root: str | os.PathLike) -> dict:
    """``encoded.json`` of a latent folder, checked."""
    path = Path(root) / SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not an encoded latent folder (no {SETTINGS_FILE}); run `d3s2 data encode`")
    settings = json.loads(path.read_text())
    if settings.get("format") != FORMAT:
        raise ValueError(f"{path}: expected format {FORMAT!r}, got {settings.get('format')!r}")
    return settings


def latent_names(root: str | os.PathLike) -> list[str]:
    """Sorted asset names of a latent folder (names may contain '/')."""
    assets = Path(root) / "assets"
    return sorted(p.relative_to(assets).as_posix()[:-4] for p in assets.rglob("*.npz")) if assets.is_dir() else []


def load_latent(root: str | os.PathLike, name: str) -> dict[str, np.ndarray]:
    """``coords`` int16 ``[n, 3]``, ``mean`` / ``logvar`` float16 ``[n, C]`` of one asset."""
    with open_asset(asset_path(root, name)) as z:
        return {k: z[k] for k in ("coords", "mean", "logvar")}


def load_vae(vae_dir: str | os.PathLike, band: float | None = None) -> tuple[torch.nn.Module, float]:
    """The SS-VAE of a ``vae`` task export and the band τ to feed it: ``band``, else its ``vae_task.json``'s, else
    the default (:func:`d3s2.models.vae.export_info.resolve_band`, as ``d3s2 reconstruct``)."""
    from ..models.registry import from_pretrained
    from ..models.vae.export_info import read_task_file, resolve_band

    root = Path(vae_dir)
    model = from_pretrained(root)
    band = resolve_band(band, read_task_file(root), root)
    if type(model).__name__ != "SparseSDFVAE":
        raise ValueError(f"{root} holds a {type(model).__name__}, expected a SparseSDFVAE")
    return model, band


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pack(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive index groups whose sizes sum to at most ``budget`` (an oversized item goes alone)."""
    groups: list[list[int]] = []
    total = 0
    for i, n in enumerate(sizes):
        if groups and total + n <= budget:
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return groups


# Settings that must match to resume a folder, with their value in folders written before they existed.
_RESUME_KEYS = {"format": None, "resolution": None, "channels": None, "band": None, "refine_steps": 0,
                "refine_lr": None}


def encode_folder(data: str | os.PathLike, vae_dir: str | os.PathLike, out: str | os.PathLike, *,
                  resolution: int = 256, device: str = "cpu", batch_tokens: int = 500_000,
                  progress: bool = True, refine_steps: int = 0, refine_lr: float = 0.03,
                  band: float | None = None) -> EncodeSummary:
    """Encode every finished asset of built folder ``data`` at ``resolution`` into ``out`` (see module docstring).

    Posterior parameters are taken in float32 (autocast bf16 on CUDA inside the encoder) and stored as float16.
    ``refine_steps > 0``: the posterior mode is refined per batch (each asset as if alone) before it is stored.
    ``band``: the τ the SDF is divided by (default: the VAE's, see :func:`load_vae`). Without it, a folder built
    with a band more than 2x from the VAE's is refused (:func:`d3s2.models.vae.export_info.check_data_matches`).
    """
    from ..models.registry import WEIGHTS_FILE
    from ..models.vae.export_info import check_data_matches, read_task_file
    from ..models.vae.refine import check_refine_settings, refine_latent
    from ..models.vae.sparse_sdf_vae import PackedSDFBatch
    from ..progress import CountProgress
    from ..sparse import SparseTensor
    from .collate import collate_packed
    from .dataset import SparseSDFDataset

    check_refine_settings(refine_steps, refine_lr)
    if Path(out).resolve() == Path(data).resolve():
        # Its asset files would pass for finished latents: nothing encoded, and the build marked a latent folder.
        raise ValueError(f"expected an output folder other than the built data folder {data}, got the same")

    t0 = time.perf_counter()
    ds = SparseSDFDataset(data, resolution, split=None, with_blocks="packed", with_image=False)
    explicit_band = band is not None
    if explicit_band and not band > 0:
        raise ValueError(f"expected band > 0, got {band:g}")
    model, band = load_vae(vae_dir, band)
    check_data_matches(read_task_file(vae_dir), data=data, data_band=float(ds.settings["band"]), band=band,
                       resolutions=[resolution], explicit_band=explicit_band)
    dev = torch.device(device)
    model = model.to(dev)
    channels = model.config.latent_channels
    settings = {"format": FORMAT, "resolution": int(resolution), "latent_resolution": int(resolution) // 8,
                "channels": int(channels), "band": band, "vae": str(vae_dir),
                "vae_sha256": _file_sha256(Path(vae_dir) / WEIGHTS_FILE), "refine_steps": int(refine_steps)}
    if refine_steps:
        settings["refine_lr"] = float(refine_lr)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    settings_path = root / SETTINGS_FILE
    if settings_path.is_file():
        old = json.loads(settings_path.read_text())
        diff = sorted(k for k, before in _RESUME_KEYS.items() if old.get(k, before) != settings.get(k))
        if diff:
            raise ValueError(f"{root} was encoded with other settings ({', '.join(diff)}: {old} vs {settings}); "
                             "use another --out")
        if old.get("vae_sha256", settings["vae_sha256"]) != settings["vae_sha256"]:
            raise ValueError(f"{root} holds the latents of another VAE (sha256 of its {WEIGHTS_FILE} "
                             f"{old['vae_sha256'][:12]}..., of {Path(vae_dir) / WEIGHTS_FILE} "
                             f"{settings['vae_sha256'][:12]}...): the latents would mix; use another --out, or "
                             f"remove {root} to encode it again")
    else:
        from ..fileio import atomic_write_text

        atomic_write_text(settings_path, json.dumps(settings, indent=2) + "\n")
    remove_stale_temps(root)  # those of an encode killed mid-write
    todo = [i for i, n in enumerate(ds.names) if not asset_path(root, n).is_file()]
    summary = EncodeSummary(skipped=len(ds) - len(todo))
    counts = ds.token_counts
    groups = _pack([counts[i] for i in todo], batch_tokens)
    use_bf16 = dev.type == "cuda"
    with CountProgress(len(todo), desc="data encode", unit="asset", enabled=progress) as bar:
        for group in groups:
            idx = [todo[j] for j in group]
            items = []
            for i in idx:
                try:
                    items.append(ds[i])
                except (OSError, ValueError, KeyError) as err:  # unreadable or incomplete asset file
                    summary.failed[ds.names[i]] = f"{type(err).__name__}: {err}"
                    bar.update(1, failed=1)
            if not items:
                continue
            x = SparseTensor.from_samples([it["coords"] for it in items],
                                          [it["sdf"].reshape(-1, 1) / band for it in items],
                                          resolution=resolution).to(dev)
            # The occupied blocks (band blocks plus the blocks that close it): the latent covers them all.
            structure = SparseTensor.from_samples([torch.as_tensor(it["block_coords"]) for it in items],
                                                  [torch.zeros(len(it["block_coords"]), 0) for it in items],
                                                  resolution=resolution // 8).to(dev)
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                z, posterior = model.encode(x, sample_posterior=False, structure=structure)
            mean = posterior.mean
            if refine_steps:
                # The decoder's targets, built as the vae training task builds them.
                p = collate_packed(items)
                batch = PackedSDFBatch.from_inside_bits(p["sdf"], p["blocks"], p["rows"], p["inside"], p["fill"],
                                                        sharp=p["sharp"], tau=band).to(dev)
                mean = refine_latent(model, batch, z, steps=refine_steps, lr=refine_lr,
                                     autocast_dtype=torch.bfloat16 if use_bf16 else None).latent.feats
            coords = z.coords.cpu()
            mean, logvar = mean.float().cpu(), posterior.logvar.float().cpu()
            for b, item in enumerate(items):
                rows = coords[:, 0] == b
                c = coords[rows, 1:].numpy().astype(np.int64)
                order = np.lexsort((c[:, 2], c[:, 1], c[:, 0]))  # x, then y, then z
                write_npz_atomic(asset_path(root, item["name"]), {
                    "coords": c[order].astype(np.int16),
                    "mean": mean[rows].numpy()[order].astype(np.float16),
                    "logvar": logvar[rows].numpy()[order].astype(np.float16),
                })
                summary.encoded += 1
                bar.update(1)
    summary.seconds = time.perf_counter() - t0
    return summary

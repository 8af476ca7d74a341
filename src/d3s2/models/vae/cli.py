"""``d3s2 reconstruct`` (mesh → SS-VAE round trip → closed mesh) and ``d3s2 eval vae`` (reconstruction metrics
over a built data folder).

Both load weights written by ``save_pretrained`` (e.g. a training run's ``export/``). The band τ is read from
the ``vae_task.json`` a training export writes beside the weights, else from ``--band``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from ...cli import eval_subparsers

log = logging.getLogger(__name__)

WEIGHTS_ENV = "D3S2_VAE_WEIGHTS"
DEFAULT_BAND = 1 / 128


def register(subparsers: argparse._SubParsersAction) -> None:
    weights_help = f"SS-VAE weights folder (save_pretrained / a run's export/; default ${WEIGHTS_ENV})"
    p = subparsers.add_parser("reconstruct", help="encode and decode a mesh with the SS-VAE (closed mesh out)")
    p.add_argument("mesh", help="input mesh (obj, ply, glb, stl, off, pmd)")
    p.add_argument("-o", "--out", required=True, help="output mesh (glb, obj, ply, stl, off)")
    p.add_argument("--resolution", type=int, default=256, help="SDF resolution R, a multiple of 8 (default 256)")
    p.add_argument("--weights", default=os.environ.get(WEIGHTS_ENV), help=weights_help)
    p.add_argument("--band", type=float, default=None, help="band τ in [-1,1] units (default: the weights' "
                   f"vae_task.json, else {DEFAULT_BAND:g})")
    p.add_argument("--chunk", type=int, default=None,
                   help="latent voxels per decode chunk edge (default: 32 when R > 512, else whole shape)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=_reconstruct)

    e = eval_subparsers(subparsers).add_parser("vae", help="SS-VAE reconstruction metrics on a built data folder")
    e.add_argument("--data", required=True, help="built data folder (d3s2 data build)")
    e.add_argument("--weights", default=os.environ.get(WEIGHTS_ENV), help=weights_help)
    e.add_argument("--split", default="test", choices=["train", "val", "test"], help="split (default test)")
    e.add_argument("--resolution", type=int, action="append", default=None,
                   help="resolution to evaluate (repeatable; default every resolution of the folder)")
    e.add_argument("--limit", type=int, default=0, help="evaluate at most this many shapes (0 = all)")
    e.add_argument("--samples", type=int, default=100_000, help="surface samples per mesh (default 100000)")
    e.add_argument("--band", type=float, default=None, help="band τ (default: the folder's build band)")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    e.add_argument("--device", default="cpu", help="cpu or cuda")
    e.set_defaults(func=_eval)


def _load(weights: str | None, device: str):
    from ..registry import from_pretrained
    from .sparse_sdf_vae import SparseSDFVAE

    if not weights:
        raise ValueError(f"no SS-VAE weights: pass --weights DIR or set ${WEIGHTS_ENV}")
    model = from_pretrained(weights, map_location=device)
    if not isinstance(model, SparseSDFVAE):
        raise ValueError(f"{weights} holds a {type(model).__name__}, expected a SparseSDFVAE")
    return model


def _weights_band(weights: str) -> float | None:
    from .task import TASK_FILE

    path = Path(weights) / TASK_FILE
    return float(json.loads(path.read_text())["band"]) if path.is_file() else None


def reconstruct_mesh(model, mesh, resolution: int, band: float, *, chunk_size: int = 0, device: str = "cpu"):
    """Mesh (any units) → normalise → band SDF at R → encode → decode → closed mesh in the input's units."""
    import torch
    import trimesh

    from ...geometry.mesh_io import normalize_mesh
    from ...geometry.sdf import compute_sparse_sdf
    from ...sparse import SparseTensor
    from .task import decode_mesh

    normalized, transform = normalize_mesh(mesh)
    sdf = compute_sparse_sdf(normalized, resolution, band)[resolution]
    if len(sdf) == 0:
        raise ValueError(f"the mesh has no band voxels at {resolution}^3 (band {band:g})")
    x = SparseTensor.from_samples([torch.from_numpy(sdf.coords.astype("int32"))],
                                  [torch.from_numpy(sdf.sdf.astype("float32")).reshape(-1, 1) / band],
                                  resolution=resolution).to(device)
    blocks = torch.from_numpy(sdf.block_coords.astype("int32"))
    structure = SparseTensor.from_samples([blocks], [torch.zeros(len(blocks), 0)], resolution=resolution // 8)
    with torch.no_grad():
        (out,) = decode_mesh(model, x, structure=structure.to(device), chunk_size=chunk_size)
    if len(out.faces) == 0:
        raise ValueError("the reconstruction is empty (every decoded value has the same sign): are the weights "
                         "trained, and is the band the one they were trained with?")
    return trimesh.Trimesh(transform.inverse(out.vertices), out.faces, process=False)


def _reconstruct(args: argparse.Namespace) -> int:
    from ...geometry.export import export_mesh
    from ...geometry.mesh_io import load_mesh

    if args.resolution % 8 or args.resolution < 8:
        raise ValueError(f"--resolution must be a multiple of 8, got {args.resolution}")
    model = _load(args.weights, args.device)
    band = args.band or _weights_band(args.weights) or DEFAULT_BAND
    mesh = load_mesh(args.mesh)  # MeshError (a ValueError) names the file and the problem
    chunk = args.chunk if args.chunk is not None else (32 if args.resolution > 512 else 0)
    out = reconstruct_mesh(model, mesh, args.resolution, band, chunk_size=chunk, device=args.device)
    export_mesh(out, args.out)
    print(f"{args.out}: {len(out.vertices)} vertices, {len(out.faces)} faces, watertight={out.is_watertight}")
    return 0


def evaluate(model, data: str, resolutions: list[int], *, split: str, band: float, limit: int = 0,
             num_samples: int = 100_000, device: str = "cpu") -> dict[int, dict[str, float]]:
    """Mean reconstruction metrics per resolution over a split: ``{R: {metric: value, "shapes": n}}``.

    The reference of each shape is the closed mesh of its own block SDF targets; empty reconstructions are
    scored as in :func:`d3s2.models.vae.task.shape_metrics` and counted in ``empty_mesh``.
    """
    import torch
    from tqdm import tqdm

    from ...data.collate import collate_sparse
    from ...data.dataset import SparseSDFDataset
    from .sparse_sdf_vae import PackedSDFBatch
    from .task import decode_mesh, shape_metrics, target_mesh

    results: dict[int, dict[str, float]] = {}
    for r in resolutions:
        ds = SparseSDFDataset(data, r, split=split, with_image=False)
        n = len(ds) if not limit else min(limit, len(ds))
        if n == 0:
            raise ValueError(f"{data}: the {split} split is empty")
        sums: dict[str, float] = {}
        for i in tqdm(range(n), desc=f"eval {r}^3", disable=n < 2):
            c = collate_sparse([ds[i]])
            batch = PackedSDFBatch.pack(c["sdf"], c["blocks"], tau=band).to(device)  # expanded on the device
            with torch.no_grad():
                (pred,) = decode_mesh(model, batch.sdf, structure=batch.block_structure())
            (ref,) = target_mesh(batch)
            m = shape_metrics(pred, ref, num_samples)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
        results[r] = {**{k: v / n for k, v in sums.items()}, "shapes": float(n)}
    return results


def _eval(args: argparse.Namespace) -> int:
    data = Path(args.data)
    if not (data / "build.json").is_file():
        raise ValueError(f"{data} is not a built data folder (no build.json); run `d3s2 data build`")
    settings = json.loads((data / "build.json").read_text())
    resolutions = args.resolution or list(settings["resolutions"])
    bad = sorted(set(resolutions) - set(settings["resolutions"]))
    if bad:
        raise ValueError(f"{data} has resolutions {settings['resolutions']}, not {bad}")
    model = _load(args.weights, args.device)
    band = args.band or float(settings["band"])
    results = evaluate(model, str(data), resolutions, split=args.split, band=band, limit=args.limit,
                       num_samples=args.samples, device=args.device)
    keys = ["chamfer_l1", "fscore@0.01", "fscore@0.005", "normal_consistency", "volume_iou", "watertight",
            "empty_mesh"]
    print(f"{'R':>6} {'shapes':>6} " + " ".join(f"{k:>18}" for k in keys))
    for r, m in results.items():
        print(f"{r:>6} {int(m['shapes']):>6} " + " ".join(f"{m[k]:>18.5f}" for k in keys))
    if args.json:
        from ...train.checkpoint import atomic_write_text

        payload = {"data": str(data), "weights": args.weights, "split": args.split,
                   "results": {str(r): m for r, m in results.items()}}
        atomic_write_text(args.json, json.dumps(payload, indent=2) + "\n")
    return 0

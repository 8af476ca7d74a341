"""``d3s2 reconstruct`` (mesh → SS-VAE round trip → closed mesh) and ``d3s2 eval vae`` (reconstruction metrics
over a built data folder).

Both load weights written by ``save_pretrained`` (e.g. a training run's ``export/``); without ``--weights`` or
``$D3S2_VAE_WEIGHTS`` they use the demo SS-VAE bundled in the package (``d3s2/assets/ss_vae_256``, trained at 256³
on the 0 A.D. corpus). The band τ is ``--band`` when given, else the one in the ``vae_task.json`` a training export
writes beside the weights, else 1/128 (:func:`d3s2.models.vae.export_info.resolve_band`, as ``d3s2 data encode``).

``eval vae`` scores the split the SS-VAE was trained with (``val_fraction`` / ``test_fraction`` of its
``vae_task.json``; older exports: 0.05 / 0.05, with a warning), refuses a data folder built with a band more than
2x from the VAE's unless ``--band`` is given, and warns when the folder's band or resolution differs from the VAE's.

``--refine-steps N`` (both): semi-amortised encoding, the encoder's latent refined by N Adam steps against the
decoder's loss on the input's own SDF (:func:`d3s2.models.vae.refine.refine_latent`); 0 = the encoder's latent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

from ...cli import eval_subparsers, resolve_device
from ...progress import bar_on_terminal
from .export_info import DEFAULT_BAND

log = logging.getLogger(__name__)

WEIGHTS_ENV = "D3S2_VAE_WEIGHTS"
BUNDLED_VAE = "ss_vae_256"  # folder under d3s2/assets
DEFAULT_REFINE_LR = 0.03


def add_refine_arguments(p: argparse.ArgumentParser) -> None:
    """``--refine-steps`` / ``--refine-lr`` (shared by reconstruct, eval vae and data encode)."""
    p.add_argument("--refine-steps", type=int, default=0,
                   help="refine the encoder's latent by this many Adam steps against the decoder's loss on the "
                        "input itself (semi-amortised encoding; each step costs about one decoder forward+backward; "
                        "default 0 = the encoder's latent)")
    p.add_argument("--refine-lr", type=float, default=DEFAULT_REFINE_LR,
                   help=f"Adam learning rate of the refinement (default {DEFAULT_REFINE_LR:g})")


def register(subparsers: argparse._SubParsersAction) -> None:
    weights_help = (f"SS-VAE weights folder (save_pretrained / a run's export/; default ${WEIGHTS_ENV}, else the "
                    "bundled demo SS-VAE)")
    p = subparsers.add_parser("reconstruct", help="encode and decode a mesh with the SS-VAE (closed mesh out)")
    p.add_argument("mesh", help="input mesh (obj, ply, glb, gltf, stl, off, pmd)")
    p.add_argument("-o", "--out", required=True, help="output mesh (glb, obj, ply, stl)")
    p.add_argument("--resolution", type=int, default=256, help="SDF resolution R, a multiple of 8 (default 256)")
    p.add_argument("--weights", default=os.environ.get(WEIGHTS_ENV), help=weights_help)
    p.add_argument("--band", type=float, default=None, help="band τ in [-1,1] units, > 0 (default: the weights' "
                   f"vae_task.json, else {DEFAULT_BAND:g})")
    p.add_argument("--chunk", type=int, default=None,
                   help="latent voxels per decode chunk edge (default: 32 when R > 512, else whole shape)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    add_refine_arguments(p)
    p.set_defaults(func=_reconstruct)

    e = eval_subparsers(subparsers).add_parser("vae", help="SS-VAE reconstruction metrics on a built data folder")
    e.add_argument("--data", required=True, help="built data folder (d3s2 data build)")
    e.add_argument("--weights", default=os.environ.get(WEIGHTS_ENV), help=weights_help)
    e.add_argument("--split", default="test", choices=["train", "val", "test"],
                   help="split (default test), with the fractions the weights were trained with (their vae_task.json)")
    e.add_argument("--resolution", type=int, action="append", default=None,
                   help="resolution to evaluate (repeatable; default every resolution of the folder)")
    e.add_argument("--limit", type=int, default=0, help="evaluate at most this many shapes (0 = all)")
    e.add_argument("--samples", type=int, default=100_000, help="surface samples per mesh (default 100000)")
    e.add_argument("--band", type=float, default=None, help="band τ, > 0 (default: the weights' vae_task.json, "
                   f"else {DEFAULT_BAND:g}); also allows data built with another band")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    e.add_argument("--per-shape", default=None, help="JSONL file of per-shape metrics, appended as each shape is "
                   "scored; shapes already in it are skipped (resume)")
    e.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    add_refine_arguments(e)
    e.set_defaults(func=_eval)


def bundled_vae_dir() -> Path:
    """Where the bundled demo SS-VAE lives (it may be missing from a build: see :func:`resolve_weights`)."""
    return Path(str(resources.files("d3s2") / "assets" / BUNDLED_VAE))


def resolve_weights(weights: str | None) -> str:
    """``weights`` if given, else the bundled demo SS-VAE folder.

    Raises:
        ValueError: no weights were given and the bundled folder is missing.
    """
    if weights:
        return weights
    bundled = bundled_vae_dir()
    if not (bundled / "config.json").is_file():
        raise ValueError(f"no SS-VAE weights: pass --weights DIR or set ${WEIGHTS_ENV} (this build has no bundled "
                         f"demo SS-VAE: expected {bundled / 'config.json'})")
    return str(bundled)


def _load(weights: str, device: str):
    from ..registry import from_pretrained
    from .sparse_sdf_vae import SparseSDFVAE

    model = from_pretrained(weights, map_location=device)
    if not isinstance(model, SparseSDFVAE):
        raise ValueError(f"{weights} holds a {type(model).__name__}, expected a SparseSDFVAE")
    return model


def _check_band(band: float | None) -> None:
    """``--band``, when given, must be positive (not a 0 that silently stands for "not given")."""
    if band is not None and not band > 0:
        raise ValueError(f"--band must be > 0, got {band:g}")


def reconstruct_mesh(model, mesh, resolution: int, band: float, *, chunk_size: int = 0, device: str = "cpu",
                     refine_steps: int = 0, refine_lr: float = DEFAULT_REFINE_LR):
    """Mesh (any units) → normalise → band SDF at R → encode (→ refine) → decode → closed mesh in the input's units.

    ``refine_steps > 0`` refines the latent against the decoder's loss on the mesh's own block SDF targets
    (:func:`d3s2.models.vae.refine.refine_latent`); it decodes the whole shape, so ``chunk_size`` must be 0.
    """
    import torch
    import trimesh

    from ...geometry.mesh_io import normalize_mesh
    from ...geometry.sdf import compute_sparse_sdf
    from ...sparse import SparseTensor
    from .refine import refine_latent
    from .sparse_sdf_vae import PackedSDFBatch
    from .task import decode_mesh, latent_meshes

    if refine_steps and chunk_size:
        raise ValueError(f"latent refinement decodes the whole shape at once, got a chunked decode (chunk "
                         f"{chunk_size}, the default above 512^3): pass --chunk 0 if the memory allows, or "
                         "--refine-steps 0")
    normalized, transform = normalize_mesh(mesh)
    sdf = compute_sparse_sdf(normalized, resolution, band)[resolution]
    if len(sdf) == 0:
        raise ValueError(f"the mesh has no band voxels at {resolution}^3 (band {band:g})")
    coords = torch.from_numpy(sdf.coords.astype("int32"))
    if refine_steps:
        blocks, targets = sdf.block_targets()
        batch = PackedSDFBatch.from_samples([coords], [torch.from_numpy(sdf.sdf.astype("float32"))],
                                            [torch.from_numpy(blocks)], [torch.from_numpy(targets)],
                                            resolution=resolution, sharp=[torch.from_numpy(sdf.sharp.astype(bool))],
                                            tau=band).to(device)
        with torch.no_grad():
            z, _ = model.encode(batch.sdf, sample_posterior=False, structure=batch.block_structure())
        z = refine_latent(model, batch, z, steps=refine_steps, lr=refine_lr, progress=bar_on_terminal()).latent
        with torch.no_grad():
            (out,) = latent_meshes(model, z)
    else:
        x = SparseTensor.from_samples([coords], [torch.from_numpy(sdf.sdf.astype("float32")).reshape(-1, 1) / band],
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
    from ...geometry.export import check_export_path, export_mesh
    from ...geometry.mesh_io import load_mesh
    from .export_info import read_task_file, resolve_band
    from .refine import check_refine_settings

    # Every argument is checked before the weights are loaded and the (long) round trip starts.
    if args.resolution % 8 or args.resolution < 8:
        raise ValueError(f"--resolution must be a multiple of 8, got {args.resolution}")
    check_refine_settings(args.refine_steps, args.refine_lr)
    if args.chunk is not None and args.chunk < 0:
        raise ValueError(f"expected --chunk >= 0 (0: the whole shape at once), got {args.chunk}")
    _check_band(args.band)
    check_export_path(args.out)
    device = resolve_device(args.device)
    args.weights = resolve_weights(args.weights)
    model = _load(args.weights, device)
    band = resolve_band(args.band, read_task_file(args.weights), args.weights)
    mesh = load_mesh(args.mesh)  # MeshError (a ValueError) names the file and the problem
    chunk = args.chunk if args.chunk is not None else (32 if args.resolution > 512 else 0)
    out = reconstruct_mesh(model, mesh, args.resolution, band, chunk_size=chunk, device=device,
                           refine_steps=args.refine_steps, refine_lr=args.refine_lr)
    export_mesh(out, args.out)
    print(f"{args.out}: {len(out.vertices)} vertices, {len(out.faces)} faces, watertight={out.is_watertight}")
    return 0


def evaluate(model, data: str, resolutions: list[int], *, split: str, val_fraction: float, test_fraction: float,
             band: float, limit: int = 0, num_samples: int = 100_000, device: str = "cpu", refine_steps: int = 0,
             refine_lr: float = DEFAULT_REFINE_LR, per_shape: str | None = None) -> dict[int, dict[str, Any]]:
    """Mean reconstruction metrics per resolution over a split: ``{R: {metric: value, "shapes": n, "names": [...]}}``
    (``names``: the shapes scored). ``val_fraction`` / ``test_fraction`` define the split
    (:func:`d3s2.data.dataset.split_of`): pass those the model was trained with, or ``split`` may hold its
    training shapes.

    The reference of each shape is the closed mesh of its own block SDF targets; empty reconstructions are
    scored as in :func:`d3s2.models.vae.task.shape_metrics` and counted in ``empty_mesh``.

    ``refine_steps > 0``: each shape's latent is refined first (:func:`d3s2.models.vae.refine.refine_latent`);
    the results then also hold ``refine_seconds`` (mean wall seconds of the refinement per shape),
    ``refine_seconds_first`` (the first shape's, which includes the warm-up of the kernels) and
    ``refine_loss_start`` / ``refine_loss_end`` (mean decoder loss of the encoder's and the kept latent).

    ``per_shape``: a JSONL file that gets one line per shape as soon as it is scored (``resolution``, ``name``,
    the refinement setting and the metrics). Shapes already in it are not scored again but count in the means,
    so a killed evaluation resumes where it stopped; a file written with another refinement setting is refused.
    """
    import time

    import torch

    from ...data.collate import collate_sparse
    from ...data.dataset import SparseSDFDataset
    from ...progress import CountProgress
    from .refine import check_refine_settings, refine_latent
    from .sparse_sdf_vae import PackedSDFBatch
    from .task import decode_mesh, latent_meshes, shape_metrics, target_mesh

    check_refine_settings(refine_steps, refine_lr)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    setting = {"refine_steps": refine_steps, "refine_lr": refine_lr if refine_steps else None}
    done = _read_per_shape(per_shape, setting) if per_shape else {}
    results: dict[int, dict[str, Any]] = {}
    for r in resolutions:
        ds = SparseSDFDataset(data, r, split=split, val_fraction=val_fraction, test_fraction=test_fraction,
                              with_image=False)
        n = len(ds) if not limit else min(limit, len(ds))
        if n == 0:
            raise ValueError(f"{data}: the {split} split is empty")
        sums: dict[str, float] = {}
        first: dict[str, float] = {}
        with CountProgress(n, desc=f"eval {r}^3", unit="shape", enabled=n > 1) as bar:
            for i in range(n):
                if (r, ds.names[i]) in done:
                    for k, v in done[(r, ds.names[i])].items():
                        sums[k] = sums.get(k, 0.0) + v
                    bar.update()
                    continue
                c = collate_sparse([ds[i]])
                # Expanded on the device; the sharp mask only weighs the refinement's L_sharp.
                batch = PackedSDFBatch.pack(c["sdf"], c["blocks"], sharp=c["sharp"], tau=band).to(device)
                m: dict[str, float] = {}
                if refine_steps:
                    with torch.no_grad():
                        z, _ = model.encode(batch.sdf, sample_posterior=False, structure=batch.block_structure())
                    sync()
                    t0 = time.perf_counter()
                    refined = refine_latent(model, batch, z, steps=refine_steps, lr=refine_lr)
                    sync()
                    m["refine_seconds"] = time.perf_counter() - t0
                    best = refined.losses.min(0).values  # [1]: the kept latent's loss
                    m["refine_loss_start"], m["refine_loss_end"] = float(refined.losses[0, 0]), float(best[0])
                    with torch.no_grad():
                        (pred,) = latent_meshes(model, refined.latent)
                else:
                    with torch.no_grad():
                        (pred,) = decode_mesh(model, batch.sdf, structure=batch.block_structure())
                (ref,) = target_mesh(batch)
                m.update(shape_metrics(pred, ref, num_samples))
                if per_shape:
                    _append_line(per_shape, {"resolution": r, "name": ds.names[i], **setting, "metrics": m})
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v
                if refine_steps and not first:  # the first shape scored in this run carries the kernels' warm-up
                    first["refine_seconds_first"] = m["refine_seconds"]
                bar.update()
        results[r] = {**{k: v / n for k, v in sums.items()}, **first, "shapes": float(n), "names": ds.names[:n]}
    return results


def _read_per_shape(path: str, setting: dict) -> dict[tuple[int, str], dict[str, float]]:
    """``{(resolution, name): metrics}`` of a per-shape JSONL file (missing: empty; a torn last line is ignored)."""
    out: dict[tuple[int, str], dict[str, float]] = {}
    if not Path(path).is_file():
        return out
    lines = Path(path).read_text().splitlines()
    for j, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if j == len(lines) - 1:  # cut off by a kill while it was written: dropped before appending again
                from ...fileio import atomic_write_text

                atomic_write_text(path, "".join(x + "\n" for x in lines[:j]))
                break
            raise ValueError(f"{path}: line {j + 1} is not JSON") from None
        got = {k: rec.get(k) for k in setting}
        if got != setting:
            raise ValueError(f"{path} was written with {got}, this evaluation uses {setting}: use another file")
        out[(int(rec["resolution"]), rec["name"])] = rec["metrics"]
    return out


def _append_line(path: str, record: dict) -> None:
    """Append one JSON line and flush it to disk (the file is the evaluation's resume point)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _eval(args: argparse.Namespace) -> int:
    from .export_info import check_data_matches, read_task_file, resolve_band, split_fractions

    data = Path(args.data)
    if not (data / "build.json").is_file():
        raise ValueError(f"{data} is not a built data folder (no build.json); run `d3s2 data build`")
    settings = json.loads((data / "build.json").read_text())
    resolutions = args.resolution or list(settings["resolutions"])
    bad = sorted(set(resolutions) - set(settings["resolutions"]))
    if bad:
        raise ValueError(f"{data} has resolutions {settings['resolutions']}, not {bad}")
    _check_band(args.band)
    device = resolve_device(args.device)
    args.weights = resolve_weights(args.weights)
    info = read_task_file(args.weights)
    band = resolve_band(args.band, info, args.weights)
    check_data_matches(info, data=data, data_band=float(settings["band"]), band=band, resolutions=resolutions,
                       explicit_band=args.band is not None)
    fractions = split_fractions(info, args.weights)
    model = _load(args.weights, device)
    results = evaluate(model, str(data), resolutions, split=args.split, **fractions, band=band, limit=args.limit,
                       num_samples=args.samples, device=device, refine_steps=args.refine_steps,
                       refine_lr=args.refine_lr, per_shape=args.per_shape)
    print(f"split: {args.split} (val_fraction {fractions['val_fraction']:g}, test_fraction "
          f"{fractions['test_fraction']:g}), band {band:g}")
    # The setting travels with every printout and JSON, so refined and encoder-only numbers never get mixed up.
    refine = {"steps": args.refine_steps, "lr": args.refine_lr if args.refine_steps else None}
    print("latent: " + (f"refined, {args.refine_steps} Adam steps at lr {args.refine_lr:g}" if args.refine_steps
                        else "the encoder's (no refinement)"))
    keys = ["chamfer_l1", "fscore@0.01", "fscore@0.005", "normal_consistency", "volume_iou", "watertight",
            "empty_mesh"]
    if args.refine_steps:
        keys += ["refine_seconds", "refine_loss_start", "refine_loss_end"]
    print(f"{'R':>6} {'shapes':>6} " + " ".join(f"{k:>18}" for k in keys))
    for r, m in results.items():
        print(f"{r:>6} {int(m['shapes']):>6} " + " ".join(f"{m[k]:>18.5f}" for k in keys))
    if args.json:
        from ...fileio import atomic_write_text

        payload = {"data": str(data), "weights": args.weights, "split": args.split, "split_fractions": fractions,
                   "band": band, "refine": refine, "results": {str(r): m for r, m in results.items()}}
        atomic_write_text(args.json, json.dumps(payload, indent=2) + "\n")
    return 0

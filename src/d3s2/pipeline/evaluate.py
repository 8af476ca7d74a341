"""``d3s2 eval generate``: image-to-3D metrics on held-out renders of a built data folder.

For each asset of a split (``test`` by default, :func:`d3s2.data.dataset.split_of`), one stored render (RGBA +
``intrinsics`` + ``world_to_camera``, written by ``d3s2 data build``) goes through the pipeline, and the mesh
it returns is scored:

- **silhouette IoU**: the input alpha mask against the generated mesh ray-cast with the *same* camera. The build
  renders in the normalised frame (bounding box centred, longest side ``2 × scale``) and the pipeline's meshes
  live in that frame too (the SDFs its VAE was trained on are the build's), so no alignment is applied. The
  image alone does not pin the object's size, depth and hidden sides, so a plausible shape can still score
  low: the plain IoU is the headline number. ``silhouette_iou_bbox`` compares the two masks after cropping each
  to its bounding box and resizing to one square (shape agreement up to 2D placement and scale), and
  ``silhouette_iou_reference`` scores the reference mesh through the same code path (1.0 for the source mesh:
  a check that the camera and the frame agree; below 1 for the SDF closure only by its resolution).
- **Chamfer-L1, F-score@0.01/0.005, normal consistency, volume IoU** against the reference mesh
  (:func:`d3s2.models.vae.task.shape_metrics`): ``reference="sdf"`` (default) is the closed mesh of the asset's
  stored band SDF at the build's highest resolution (watertight, what the VAE learns; no corpus needed),
  ``reference="source"`` the normalised source mesh (the build record's source, or ``corpus``), which may be
  open and hold inner surfaces.
- **watertight** (trimesh) and **seconds** (pipeline call; ``seconds_total`` with the scoring).

An asset the pipeline fails on (e.g. an empty structure) is kept with ``error`` and the worst scores, so means
over assets stay comparable. Outputs in ``out``: ``per_asset.jsonl`` (rewritten atomically after each asset),
``summary.json`` (means and settings, atomic) and ``renders/<asset>.png`` for the first ``num_renders`` assets
(input | generated mesh, same camera | masks: green both, red input only, blue generated only).

Dimension legend: H×W image size, V views.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trimesh

log = logging.getLogger(__name__)

REFERENCES = ("sdf", "source")
PER_ASSET_FILE = "per_asset.jsonl"
SUMMARY_FILE = "summary.json"
RENDER_DIR = "renders"
BBOX_IOU_SIZE = 128  # side of the square both masks are resized to for silhouette_iou_bbox
# Scores of an asset the pipeline failed on (no mesh): the worst value of each metric.
FAILED_SCORES = {"silhouette_iou": 0.0, "silhouette_iou_bbox": 0.0}


@dataclass(kw_only=True)
class GenerateEvalConfig:
    split: str | None = "test"  # None: every asset of the folder
    limit: int = 0  # at most this many assets (0 = all)
    view: int = 0  # which stored render of each asset is the input
    seed: int = 0
    steps: int | None = None  # every stage's sampling steps (default: the pipeline's)
    cfg: float | None = None  # every stage's guidance scale (default: the pipeline's)
    resolution: int | None = None  # mesh resolution (default: the pipeline's highest)
    reference: str = "sdf"  # "sdf" or "source", see the module docstring
    corpus: str | None = None  # the corpus npz for reference="source" (default: the build record's path)
    num_samples: int = 20_000  # surface samples per mesh for the geometry metrics
    num_renders: int = 4  # comparison PNGs for the first assets
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.reference not in REFERENCES:
            raise ValueError(f"expected reference in {REFERENCES}, got {self.reference!r}")
        if self.limit < 0 or self.view < 0 or self.num_samples < 1 or self.num_renders < 0:
            raise ValueError(f"expected limit, view, num_renders >= 0 and num_samples >= 1, got limit {self.limit}, "
                             f"view {self.view}, num_samples {self.num_samples}, num_renders {self.num_renders}")


# -------------------------------------------------------------------------------------------- silhouettes
def silhouette(mesh: trimesh.Trimesh, K: np.ndarray, world_to_camera: np.ndarray, width: int,
               height: int) -> np.ndarray:
    """bool ``[H, W]``: pixels whose centre ray hits ``mesh`` (the build's renderer, so the build's alpha rule)."""
    from ..geometry.render import RayCaster, render_view

    if len(mesh.faces) == 0:
        return np.zeros((height, width), bool)
    caster = RayCaster(mesh.vertices, mesh.faces)
    image = render_view(caster, np.asarray(mesh.face_normals, np.float64), np.asarray(K, np.float64),
                        np.asarray(world_to_camera, np.float64), width, height)
    return image[..., 3] > 0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks of one shape; 1.0 when both are empty."""
    if a.shape != b.shape:
        raise ValueError(f"expected masks of one shape, got {a.shape} and {b.shape}")
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _crop_square(mask: np.ndarray, size: int) -> np.ndarray:
    """The mask cropped to its bounding box, padded square (centred) and resized to ``size``²: bool."""
    from PIL import Image

    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = crop.shape
    side = max(h, w)
    square = np.zeros((side, side), np.uint8)
    y0, x0 = (side - h) // 2, (side - w) // 2
    square[y0:y0 + h, x0:x0 + w] = crop * 255
    resized = Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized) >= 128


def bbox_iou(a: np.ndarray, b: np.ndarray, size: int = BBOX_IOU_SIZE) -> float:
    """IoU after cropping each mask to its bounding box and resizing to ``size``²: 0.0 when one is empty."""
    if not a.any() or not b.any():
        return float(a.any() == b.any())
    return mask_iou(_crop_square(a, size), _crop_square(b, size))


# -------------------------------------------------------------------------------------------- references
def sdf_reference(arrays: dict[str, np.ndarray], resolution: int) -> trimesh.Trimesh:
    """The closed mesh of an asset's stored band SDF at ``resolution`` (``[-1, 1]``, the build's frame)."""
    import torch

    from ..geometry.sdf import SparseSDF
    from .extract import BLOCK, closed_mesh

    prefix = f"sdf{resolution}/"
    sdf = SparseSDF.from_arrays({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
    blocks, target = sdf.block_targets(BLOCK)  # [NB, 3], [NB, 512] (lx, ly, lz) lexicographic, z fastest
    local = np.stack(np.meshgrid(*[np.arange(BLOCK)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = (blocks[:, None, :].astype(np.int64) * BLOCK + local[None]).reshape(-1, 3)  # [NB * 512, 3]
    return closed_mesh(torch.from_numpy(coords), torch.from_numpy(target.reshape(-1)),
                       torch.from_numpy(blocks.astype(np.int64)), resolution)


def source_reference(name: str, record: dict, arrays: dict[str, np.ndarray],
                     corpus: str | None = None) -> trimesh.Trimesh:
    """The asset's source mesh, normalised with the transform stored by the build."""
    from ..data.build import CORPUS_PREFIX, AssetSource, load_source_mesh
    from ..geometry.mesh_io import NormalizeTransform

    source = str(record.get("source", ""))
    prefix = CORPUS_PREFIX + "/"
    if name.startswith(prefix):
        corpus_name = name[len(prefix):]
        path = corpus or source[:-(len(corpus_name) + 1)]  # the record's source is "<npz path>:<corpus name>"
        asset = AssetSource(name, path, corpus_name)
    else:
        asset = AssetSource(name, source)
    if not asset.path or not Path(asset.path).is_file():
        raise FileNotFoundError(f"{name}: source mesh file not found ({asset.path or 'no source in the manifest'}); "
                                "pass the corpus npz (--corpus) or use --reference sdf")
    mesh = load_source_mesh(asset)
    transform = NormalizeTransform(np.asarray(arrays["normalize/center"], np.float64),
                                   float(arrays["normalize/scale"]))
    return trimesh.Trimesh(transform.apply(mesh.vertices), mesh.faces, process=False)


# -------------------------------------------------------------------------------------------- renders
def comparison_image(rgba: np.ndarray, mesh: trimesh.Trimesh, K: np.ndarray, world_to_camera: np.ndarray
                     ) -> np.ndarray:
    """uint8 ``[H, 3W, 3]``: the input on white | the generated mesh shaded, same camera | the two masks."""
    from ..geometry.render import RayCaster, render_view

    h, w = rgba.shape[:2]
    white = np.full((h, w, 3), 255, np.uint8)

    def on_white(im: np.ndarray) -> np.ndarray:
        a = im[..., 3:4].astype(np.float32) / 255
        return (im[..., :3] * a + white * (1 - a)).round().astype(np.uint8)

    if len(mesh.faces):
        caster = RayCaster(mesh.vertices, mesh.faces)
        render = render_view(caster, np.asarray(mesh.face_normals, np.float64), np.asarray(K, np.float64),
                             np.asarray(world_to_camera, np.float64), w, h, albedo=(0.55, 0.7, 0.9))
    else:
        render = np.zeros((h, w, 4), np.uint8)
    a, b = rgba[..., 3] > 0, render[..., 3] > 0
    masks = white.copy()
    masks[a & b] = (60, 170, 60)
    masks[a & ~b] = (220, 60, 60)
    masks[~a & b] = (60, 90, 220)
    return np.concatenate([on_white(rgba), on_white(render), masks], axis=1)


# -------------------------------------------------------------------------------------------- evaluation
def _asset_names(data: Path, split: str | None) -> list[str]:
    from ..data.build import asset_path, read_manifest
    from ..data.dataset import split_of

    records = read_manifest(data)
    names = sorted({n for n, r in records.items() if r.get("status") == "ok"}
                   | {p.relative_to(data / "assets").as_posix()[:-4] for p in (data / "assets").rglob("*.npz")})
    names = [n for n in names if asset_path(data, n).exists()]
    return [n for n in names if split is None or split_of(n) == split]


def _score(mesh: trimesh.Trimesh | None, ref: trimesh.Trimesh, mask: np.ndarray, K: np.ndarray, w2c: np.ndarray,
           num_samples: int) -> dict[str, float]:
    from ..models.vae.task import shape_metrics

    h, w = mask.shape
    if mesh is None:
        return {**FAILED_SCORES, **shape_metrics(trimesh.Trimesh(), ref, num_samples)}
    gen = silhouette(mesh, K, w2c, w, h)
    return {"silhouette_iou": mask_iou(mask, gen), "silhouette_iou_bbox": bbox_iou(mask, gen),
            **shape_metrics(mesh, ref, num_samples)}


def _safe_name(name: str) -> str:
    return name.replace("/", "__")


def evaluate_generation(pipe: Any, data: str | os.PathLike, out: str | os.PathLike,
                        config: GenerateEvalConfig | None = None, *, weights: str | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Run ``pipe`` (an :class:`~d3s2.pipeline.image_to_3d.ImageTo3DPipeline`) on one render per asset of
    ``data`` and score it; writes the files of the module docstring into ``out`` and returns the summary."""
    from ..data.build import asset_images, asset_path, load_asset, read_manifest
    from ..fileio import atomic_write, atomic_write_text
    from ..geometry.render import decode_png, encode_png
    from ..progress import CountProgress

    cfg = config or GenerateEvalConfig()
    data, out = Path(data), Path(out)
    settings_path = data / "build.json"
    if not settings_path.is_file():
        raise FileNotFoundError(f"{data} is not a built data folder (no build.json); run `d3s2 data build`")
    settings = json.loads(settings_path.read_text())
    if not settings.get("views"):
        raise ValueError(f"{data} was built without renders (views=0): nothing to condition on")
    if cfg.view >= settings["views"]:
        raise ValueError(f"expected view in [0, {settings['views']}) for {data}, got {cfg.view}")
    resolution = cfg.resolution if cfg.resolution is not None else pipe.resolutions[-1]
    if resolution not in pipe.resolutions:
        raise ValueError(f"expected resolution in {pipe.resolutions}, got {resolution}")
    names = _asset_names(data, cfg.split)
    if cfg.limit:
        names = names[:cfg.limit]
    if not names:
        raise ValueError(f"{data}: no built asset in the {cfg.split or 'whole'} split")
    ref_resolution = max(settings["resolutions"])
    records = read_manifest(data) if cfg.reference == "source" else {}
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    rows: list[dict[str, Any]] = []
    bar = CountProgress(len(names), desc="eval generate", unit="asset", enabled=progress)
    for i, name in enumerate(names):
        t0 = time.perf_counter()
        arrays = load_asset(asset_path(data, name))
        rgba = decode_png(asset_images(arrays)[cfg.view])  # [H, W, 4]
        K = arrays["render/intrinsics"][cfg.view].astype(np.float64)
        w2c = arrays["render/world_to_camera"][cfg.view].astype(np.float64)
        mask = rgba[..., 3] > 0
        if cfg.reference == "sdf":
            ref = sdf_reference(arrays, ref_resolution)
        else:
            ref = source_reference(name, records.get(name, {}), arrays, cfg.corpus)
        row: dict[str, Any] = {"name": name, "view": cfg.view, "error": None}
        mesh = None
        t1 = time.perf_counter()
        try:
            mesh = pipe(rgba, resolution=resolution, seed=cfg.seed, steps=cfg.steps, cfg=cfg.cfg, device=cfg.device,
                        progress=False)
        except (ValueError, RuntimeError) as err:  # one failed asset is scored as empty, the run goes on
            row["error"] = f"{type(err).__name__}: {err}"
            log.warning("%s: %s", name, row["error"])
        row["seconds"] = time.perf_counter() - t1
        row["faces"] = int(len(mesh.faces)) if mesh is not None else 0
        row.update(_score(mesh, ref, mask, K, w2c, cfg.num_samples))
        row["silhouette_iou_reference"] = mask_iou(mask, silhouette(ref, K, w2c, mask.shape[1], mask.shape[0]))
        row["seconds_total"] = time.perf_counter() - t0
        if i < cfg.num_renders:
            png = encode_png(comparison_image(rgba, mesh if mesh is not None else trimesh.Trimesh(), K, w2c))
            atomic_write(out / RENDER_DIR / f"{_safe_name(name)}.png", lambda f, b=png: f.write(b))
        rows.append(row)
        lines.append(json.dumps(row, sort_keys=True))
        atomic_write_text(out / PER_ASSET_FILE, "\n".join(lines) + "\n")
        bar.update(1, failed=int(row["error"] is not None))
    bar.close()
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "view"]
    summary = {
        "data": str(data), "weights": weights, "assets": len(rows), "failed": sum(r["error"] is not None for r in rows),
        "resolution": resolution, "reference": cfg.reference,
        "reference_resolution": ref_resolution if cfg.reference == "sdf" else None,
        "config": asdict(cfg), "means": {k: float(np.mean([r[k] for r in rows])) for k in keys},
        # The first call also pays one-off costs (CUDA/Triton warm-up): the median is the typical time.
        "median_seconds": float(np.median([r["seconds"] for r in rows])),
    }
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def format_table(rows: list[dict[str, Any]], means: dict[str, float]) -> str:
    """A fixed-width table: one line per asset and a mean line."""
    cols = [("silhouette_iou", "IoU"), ("silhouette_iou_bbox", "IoU-bbox"), ("silhouette_iou_reference", "IoU-ref"),
            ("chamfer_l1", "chamfer"), ("fscore@0.01", "F@0.01"), ("watertight", "watertight"), ("seconds", "s")]
    width = max([len("mean")] + [len(r["name"]) for r in rows])
    lines = [f"{'asset':<{width}} " + " ".join(f"{h:>10}" for _, h in cols)]
    for r in rows:
        cells = " ".join(f"{float(r[k]):>10.4f}" for k, _ in cols)
        lines.append(f"{r['name']:<{width}} {cells}" + (f"  ({r['error']})" if r["error"] else ""))
    lines.append(f"{'mean':<{width}} " + " ".join(f"{means[k]:>10.4f}" for k, _ in cols))
    return "\n".join(lines)


def read_rows(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-asset records of an evaluation folder."""
    return [json.loads(line) for line in (Path(out) / PER_ASSET_FILE).read_text().splitlines() if line]

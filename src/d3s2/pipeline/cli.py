"""``d3s2 generate IMAGE_OR_DIR... -o OUT``: image(s) → watertight mesh file(s); ``d3s2 eval generate``: the
pipeline's metrics on held-out renders of a built data folder (:mod:`d3s2.pipeline.evaluate`).

Weights: ``--weights DIR``, else ``$D3S2_WEIGHTS``, else the bundled demo pipeline (:func:`d3s2.pipeline.demo_weights`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..cli import eval_subparsers

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
FORMATS = ("glb", "obj", "ply")
WEIGHTS_ENV = "D3S2_WEIGHTS"



def add_weights_arguments(p: argparse.ArgumentParser) -> None:
    """``--weights``, ``--conditioner`` and ``--device``, shared by every command that runs a pipeline."""
    p.add_argument("--weights", default=os.environ.get(WEIGHTS_ENV),
                   help=f"pipeline folder (pipeline.json + components); default ${WEIGHTS_ENV}, else the bundled "
                        "demo pipeline")
    p.add_argument("--conditioner", default=None,
                   help="image encoder weights when the folder has none (DINOv2 Hugging Face folder or .pth)")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="image(s) → watertight 3D mesh(es)",
                              description="Generate one mesh per input image (RGBA with the object's alpha works "
                                          "best). A directory input takes every image file in it.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("-o", "--out", required=True,
                   help="output directory, or a file name (.glb/.obj/.ply) when there is one input image")
    p.add_argument("--resolution", type=int, default=None, help="mesh resolution, 512 or 1024 (default: highest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="sampling steps for every stage (default: per stage)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale for every stage (default: per stage)")
    p.add_argument("--faces", type=int, default=None, help="decimate to about N faces")
    add_weights_arguments(p)
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--low-vram", action="store_true",
                         help="only the running model on the GPU, nothing brought in ahead (slower)")
    weights.add_argument("--keep-weights", action="store_true",
                         help="keep every model on the GPU for the whole run (default on CUDA: only the running "
                              "model and the next two, copied in ahead)")
    p.add_argument("--format", choices=FORMATS, default="glb")
    p.add_argument("--occupancy-threshold", type=float, default=None,
                   help="structure stage threshold on sigmoid(logit) (default: the pipeline's, 0.1 published)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)

    e = eval_subparsers(subparsers).add_parser(
        "generate", help="image-to-3D metrics (silhouette IoU, Chamfer) on held-out renders of a built data folder",
        description="For each asset of a split, generate a mesh from one stored render and score it against the "
                    "input mask (same camera) and the reference mesh. Writes per_asset.jsonl, summary.json and "
                    "renders/*.png into --out.")
    e.add_argument("--data", required=True, help="built data folder (d3s2 data build) with renders")
    e.add_argument("--weights", default=os.environ.get(WEIGHTS_ENV),
                   help=f"pipeline folder; default ${WEIGHTS_ENV}, else the bundled demo pipeline")
    e.add_argument("--conditioner", default=None, help="image encoder weights when the folder has none")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--split", default="test", choices=["train", "val", "test", "all"], help="split (default test)")
    e.add_argument("--limit", type=int, default=0, help="at most this many assets (0 = all)")
    e.add_argument("--view", type=int, default=0, help="which stored render of each asset (default 0)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--steps", type=int, default=None, help="sampling steps for every stage (default: per stage)")
    e.add_argument("--cfg", type=float, default=None, help="guidance scale for every stage (default: per stage)")
    e.add_argument("--resolution", type=int, default=None, help="mesh resolution (default: the pipeline's highest)")
    e.add_argument("--occupancy-threshold", type=float, default=None, help="structure stage threshold override")
    e.add_argument("--reference", default="sdf", choices=["sdf", "source"],
                   help="Chamfer reference: the closed mesh of the stored SDF (default) or the normalised source mesh")
    e.add_argument("--corpus", default=None, help="corpus npz for --reference source (default: the build record's)")
    e.add_argument("--samples", type=int, default=20_000, help="surface samples per mesh (default 20000)")
    e.add_argument("--renders", type=int, default=4, help="comparison PNGs for the first N assets (default 4)")
    e.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=run_eval)


def resolve_weights(weights: str | None) -> str:
    """``weights`` if given (the flag or ``$D3S2_WEIGHTS``), else the bundled demo pipeline."""
    from . import demo_weights

    return weights if weights else str(demo_weights())


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files named directly, plus the image files (sorted) of named directories."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in directory {p}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    return out


def output_paths(images: list[Path], out: str, fmt: str) -> list[Path]:
    target = Path(out)
    if target.suffix.lower().lstrip(".") in FORMATS:
        if len(images) != 1:
            raise ValueError(f"-o {out} names one file but there are {len(images)} input images; "
                             "pass a directory")
        return [target]
    stems = [p.stem for p in images]
    # Same stem from two directories: keep both outputs apart.
    return [target / (f"{s}.{fmt}" if stems.count(s) == 1 else f"{s}_{i}.{fmt}") for i, s in enumerate(stems)]


def run(args: argparse.Namespace) -> int:
    import torch

    from ..geometry.export import export_mesh
    from .image_to_3d import ImageTo3DPipeline

    weights = resolve_weights(args.weights)
    images = collect_images(args.inputs)
    outputs = output_paths(images, args.out, args.format)
    pipe = ImageTo3DPipeline.from_pretrained(weights, conditioner=args.conditioner,
                                             resolutions=[args.resolution] if args.resolution else None)
    if args.resolution is not None and args.resolution not in pipe.resolutions:
        raise ValueError(f"expected --resolution in {pipe.resolutions} for {weights}, got {args.resolution}")
    if args.occupancy_threshold is not None:
        pipe.settings.occupancy_threshold = args.occupancy_threshold
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    failed = 0
    for image, out in zip(images, outputs):
        try:
            mesh = pipe(image, resolution=args.resolution, seed=args.seed, steps=args.steps, cfg=args.cfg,
                        faces=args.faces, device=device, progress=not args.no_progress, low_vram=args.low_vram,
                        residency="resident" if args.keep_weights else None)
        except (ValueError, FileNotFoundError, RuntimeError) as err:
            # One bad image does not stop the others.
            print(f"d3s2 generate: error: {image}: {err}", file=sys.stderr)
            failed += 1
            continue
        export_mesh(mesh, out)
        secs = pipe.last_timing.seconds.get("total", 0.0)
        print(f"{image} -> {out} ({len(mesh.faces)} faces, watertight {mesh.is_watertight}, {secs:.1f} s)")
    return 1 if failed else 0


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from .evaluate import GenerateEvalConfig, evaluate_generation, format_table, read_rows
    from .image_to_3d import ImageTo3DPipeline

    weights = resolve_weights(args.weights)
    config = GenerateEvalConfig(split=None if args.split == "all" else args.split, limit=args.limit, view=args.view,
                                seed=args.seed, steps=args.steps, cfg=args.cfg, resolution=args.resolution,
                                reference=args.reference, corpus=args.corpus, num_samples=args.samples,
                                num_renders=args.renders,
                                device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = ImageTo3DPipeline.from_pretrained(weights, conditioner=args.conditioner)
    if args.occupancy_threshold is not None:
        pipe.settings.occupancy_threshold = args.occupancy_threshold
    summary = evaluate_generation(pipe, args.data, args.out, config, weights=weights,
                                  progress=not args.no_progress)
    print(format_table(read_rows(args.out), summary["means"]))
    print(f"{summary['assets']} assets ({summary['failed']} failed) at {summary['resolution']}³, reference "
          f"{summary['reference']}; results in {args.out}")
    return 0

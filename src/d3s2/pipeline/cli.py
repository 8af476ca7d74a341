"""``d3s2 generate IMAGE_OR_DIR... -o OUT``: image(s) → watertight mesh file(s); ``d3s2 eval generate``: the
pipeline's metrics on held-out renders of a built data folder (:mod:`d3s2.pipeline.evaluate`).

Weights: ``--weights DIR``, else ``$D3S2_WEIGHTS``, else the bundled demo pipeline (:func:`d3s2.pipeline.demo_weights`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..cli import eval_subparsers
from ..progress import bar_on_terminal

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
FORMATS = ("glb", "obj", "ply", "stl")  # d3s2.geometry.export.EXPORT_FORMATS, not imported: it loads trimesh
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
                   help="output directory (a path without a suffix, or ending in /), or a mesh file name "
                        "(.glb/.obj/.ply/.stl) when there is one input image")
    p.add_argument("--resolution", type=int, default=None,
                   help="mesh resolution: one of the pipeline's resolutions (default: the highest)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed, 0 to 2**63 - 1: the same seed, image, settings and device give the same mesh "
                        "(default 0)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps for every stage, ≥ 1 (default: per stage)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale for every stage (default: per stage)")
    p.add_argument("--faces", type=int, default=None, help="decimate to about N faces (may break watertightness)")
    add_weights_arguments(p)
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--low-vram", action="store_true",
                         help="only the running model on the GPU, nothing brought in ahead (slower)")
    weights.add_argument("--keep-weights", action="store_true",
                         help="keep every model on the GPU for the whole run (default on CUDA: only the running "
                              "model and the next two, copied in ahead)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="file format of the meshes written into an output directory (default glb); a file "
                        "name in -o sets its own")
    p.add_argument("--occupancy-threshold", type=float, default=None,
                   help="structure stage threshold on sigmoid(logit), in (0, 1) (default: the pipeline's, 0.1 "
                        "published)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
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
    e.add_argument("--seed", type=int, default=0, help="random seed of every generation (default 0)")
    e.add_argument("--steps", type=int, default=None, help="sampling steps for every stage, ≥ 1 (default: per stage)")
    e.add_argument("--cfg", type=float, default=None, help="guidance scale for every stage (default: per stage)")
    e.add_argument("--resolution", type=int, default=None,
                   help="mesh resolution: one of the pipeline's resolutions (default: the highest)")
    e.add_argument("--occupancy-threshold", type=float, default=None,
                   help="structure stage threshold on sigmoid(logit), in (0, 1) (default: the pipeline's)")
    e.add_argument("--reference", default="sdf", choices=["sdf", "source"],
                   help="Chamfer reference: the closed mesh of the stored SDF (default) or the normalised source mesh")
    e.add_argument("--corpus", default=None, help="corpus npz for --reference source (default: the build record's)")
    e.add_argument("--samples", type=int, default=20_000, help="surface samples per mesh (default 20000)")
    e.add_argument("--renders", type=int, default=4, help="comparison PNGs for the first N assets (default 4)")
    e.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bars")
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


def usable_images(images: list[Path], *, progress: bool = True) -> list[Path]:
    """The ``images`` a run can read, each opened and decoded once before any weights load; every other one
    (unreadable, not an image, too small or too large, an empty alpha channel) gets its one-line error."""
    from tqdm.auto import tqdm

    from ..models.conditioner import check_object_alpha, load_image

    usable, failures = [], []
    for image in tqdm(images, desc="checking images", unit="image", leave=False,
                      disable=not progress or len(images) < 3):
        # Its warnings (damaged EXIF metadata, ...): a usable image's run reads it again and reports them with its
        # other warnings; a failing one reports them before its error.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            try:
                check_object_alpha(load_image(image))
            except (ValueError, OSError) as err:
                failures.append((image, [str(w.message) for w in caught], err))
                continue
        usable.append(image)
    for image, messages, err in failures:  # after the bar is cleared, not drawn through it
        report_warnings(image, messages)
        report_failure(image, err)
    return usable


def report_failure(image: Path, err: Exception) -> None:
    """One image's error as one line (its traceback at debug level, shown by -v)."""
    logger.debug("%s failed", image, exc_info=err)
    print(f"d3s2 generate: error: {image}: {err}", file=sys.stderr)


def report_warnings(image: Path, messages: list[str]) -> None:
    """Each distinct warning message of ``image`` as one line naming it, in order (every image encoder of a
    pipeline prepares the image again, with the same warnings)."""
    for message in dict.fromkeys(messages):
        print(f"d3s2 generate: warning: {image}: {message}", file=sys.stderr)


@contextlib.contextmanager
def warnings_reported_for(image: Path) -> Iterator[None]:
    """The warnings raised while ``image`` runs, reported as :func:`report_warnings` lines (before an error of the
    same image), instead of Python's once-per-source-line form, which in a batch shows the first image's only and
    names none."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            yield
        finally:
            report_warnings(image, [str(warning.message) for warning in caught])


def check_sampling_arguments(args: argparse.Namespace) -> None:
    """``--steps``, ``--cfg``, ``--occupancy-threshold`` and ``--seed`` that no run can use: errors before any
    weights load."""
    from .image_to_3d import MAX_SEED

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"expected --steps ≥ 1, got {args.steps}")
    if args.cfg is not None and not (math.isfinite(args.cfg) and args.cfg >= 0):
        raise ValueError(f"expected a finite --cfg ≥ 0 (0: the unconditional prediction), got {args.cfg}")
    threshold = args.occupancy_threshold
    # sigmoid ≥ 0 keeps the whole grid (minutes of sampling), ≥ 1 keeps nothing.
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise ValueError(f"expected --occupancy-threshold in (0, 1), got {threshold}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"expected --seed in [0, {MAX_SEED}], got {args.seed}")


def check_resolution(weights: str, resolution: int | None) -> None:
    """``--resolution`` against the folder's ``pipeline.json``, before any weights load."""
    from .image_to_3d import read_resolutions

    available = read_resolutions(weights)
    if resolution is not None and resolution not in available:
        raise ValueError(f"expected --resolution in {available} for {weights}, got {resolution}")


def output_names(stems: list[str]) -> list[str]:
    """One distinct output name per image: its stem, or ``<stem>_<position>`` for a stem several images share (same
    name in two directories, or two suffixes), made longer while another image already has that name (x_1.png)."""
    taken = {stem for stem in stems if stems.count(stem) == 1}
    names = []
    for i, stem in enumerate(stems):
        name = stem
        if stems.count(stem) > 1:
            name = f"{stem}_{i}"
            while name in taken:
                name = f"{name}_{i}"
            taken.add(name)
        names.append(name)
    return names


def output_paths(images: list[Path], out: str, fmt: str | None) -> list[Path]:
    """The file each image's mesh goes to: ``out`` itself when it names a mesh file (one image), else one file per
    image in the directory ``out``. Raises ValueError for an ``-o`` or ``--format`` that cannot be honoured and for
    paths that cannot be written, before anything is generated."""
    target = Path(out)
    suffix = target.suffix.lower().lstrip(".")
    # A trailing / names a directory; so does an existing directory whose suffix is no mesh format ("run.2").
    is_directory = out.endswith(("/", os.sep)) or not suffix or (suffix not in FORMATS and target.is_dir())
    if is_directory:
        fmt = fmt or "glb"
        paths = [target / f"{name}.{fmt}" for name in output_names([p.stem for p in images])]
    else:
        if suffix not in FORMATS:
            raise ValueError(f"expected -o to end in {'/'.join('.' + f for f in FORMATS)} or to be a directory "
                             f"(no suffix, or a trailing /), got {out}")
        if fmt is not None and fmt != suffix:
            raise ValueError(f"-o {out} names a .{suffix} file but --format is {fmt}: expected them to agree "
                             "(or only one of them)")
        if len(images) != 1:
            raise ValueError(f"-o {out} names one file but there are {len(images)} input images; "
                             "pass a directory")
        paths = [target]
    from ..geometry.export import check_export_path  # here: trimesh stays out of the parser's imports

    for path in paths:
        try:
            check_export_path(path)
        except ValueError as err:
            hint = " (end -o with / to write into it)" if path.is_dir() else ""
            raise ValueError(f"-o {out}: {err}{hint}") from None
    return paths


def run(args: argparse.Namespace) -> int:
    from ..cli import resolve_device
    from ..geometry.export import export_mesh
    from .image_to_3d import ImageTo3DPipeline, require_surface

    check_sampling_arguments(args)
    progress = bar_on_terminal(not args.no_progress)  # bars only: one line per image is printed anyway
    if args.faces is not None and args.faces < 1:
        raise ValueError(f"expected --faces ≥ 1, got {args.faces}")
    images = collect_images(args.inputs)
    outputs = output_paths(images, args.out, args.format)
    device = resolve_device(args.device)
    weights = resolve_weights(args.weights)
    check_resolution(weights, args.resolution)
    usable = set(usable_images(images, progress=progress))
    work = [(image, out) for image, out in zip(images, outputs) if image in usable]
    failed = len(images) - len(work)
    if not work:
        return 1  # every image was reported: no weights to load
    pipe = ImageTo3DPipeline.from_pretrained(weights, conditioner=args.conditioner,
                                             resolutions=[args.resolution] if args.resolution else None,
                                             progress=progress)
    if args.occupancy_threshold is not None:
        pipe.settings.occupancy_threshold = args.occupancy_threshold
    for image, out in work:
        try:
            with warnings_reported_for(image):
                mesh = pipe(image, resolution=args.resolution, seed=args.seed, steps=args.steps, cfg=args.cfg,
                            faces=args.faces, device=device, progress=progress, low_vram=args.low_vram,
                            residency="resident" if args.keep_weights else None)
            export_mesh(require_surface(mesh), out)
        except (ValueError, OSError, RuntimeError) as err:
            # One bad image (no object, empty structure or surface) or unwritable output does not stop the others; any
            # other exception is a bug and propagates.
            report_failure(image, err)
            failed += 1
            continue
        secs = pipe.last_timing.seconds.get("total", 0.0)
        print(f"{image} -> {out} ({len(mesh.faces)} faces, watertight {mesh.is_watertight}, {secs:.1f} s)")
        if args.faces is not None and not mesh.is_watertight:
            print(f"d3s2 generate: warning: {out}: decimating to about {args.faces} faces broke watertightness "
                  "(leave out --faces for a watertight mesh)", file=sys.stderr)
    return 1 if failed else 0


def run_eval(args: argparse.Namespace) -> int:
    from ..cli import resolve_device
    from .evaluate import PER_ASSET_FILE, GenerateEvalConfig, evaluate_generation, format_table, read_rows
    from .image_to_3d import ImageTo3DPipeline

    check_sampling_arguments(args)
    device = resolve_device(args.device)
    weights = resolve_weights(args.weights)
    check_resolution(weights, args.resolution)
    config = GenerateEvalConfig(split=None if args.split == "all" else args.split, limit=args.limit, view=args.view,
                                seed=args.seed, steps=args.steps, cfg=args.cfg, resolution=args.resolution,
                                reference=args.reference, corpus=args.corpus, num_samples=args.samples,
                                num_renders=args.renders, device=device)
    pipe = ImageTo3DPipeline.from_pretrained(weights, conditioner=args.conditioner,
                                             progress=bar_on_terminal(not args.no_progress))
    if args.occupancy_threshold is not None:
        pipe.settings.occupancy_threshold = args.occupancy_threshold
    # per asset: a bar on a terminal, else a log line now and then
    summary = evaluate_generation(pipe, args.data, args.out, config, weights=weights,
                                  progress=not args.no_progress)
    print(format_table(read_rows(args.out), summary["means"]))
    print(f"{summary['assets']} assets ({summary['failed']} failed) at {summary['resolution']}³, reference "
          f"{summary['reference']}; results in {args.out}")
    if summary["failed"]:
        # Scored as empty meshes, but a script must not take a run with failures (out of memory too) for a clean one.
        print(f"d3s2 eval generate: error: {summary['failed']} of {summary['assets']} assets failed (each scored as "
              f"an empty mesh; its error is in {Path(args.out) / PER_ASSET_FILE})", file=sys.stderr)
        return 1
    return 0

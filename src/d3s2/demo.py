"""``d3s2 demo``: the most complete job the package can run on a bundled example, on the CPU in a few minutes.

With the bundled demo pipeline (:func:`d3s2.pipeline.demo_weights`, small models trained here on the 0 A.D.
corpus) it runs image → 3D: ``--image PATH`` (e.g. ``examples/horse_lusitano.png``, what ``make demo`` passes),
else a render of a bundled example mesh, scored against that mesh (silhouette IoU with the same camera,
Chamfer-L1, F-score). It writes ``<name>.glb`` (watertight) and ``<name>_report.json``, plus
``<name>_input.png`` and ``<name>_compare.png`` for a rendered example.

Without the demo pipeline (a build that does not ship it) it says so and runs the data path end to end on a
bundled mesh instead: load → normalise → closed narrow-band sparse SDF → sparse marching cubes → watertight GLB,
with geometry metrics against the input and a side-by-side render. Example meshes and images: 0 A.D.
(CC-BY-SA-3.0, Wildfire Games).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from .fileio import atomic_write_bytes
from .progress import bar_on_terminal

logger = logging.getLogger(__name__)

DEFAULT_EXAMPLE = "horse_lusitano"  # a test-split asset: no demo model was trained on it


def bundled_examples() -> dict[str, Path]:
    """Name → path of the example meshes shipped in ``d3s2/assets/examples``."""
    root = resources.files("d3s2") / "assets" / "examples"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".glb")}


def run_demo(mesh_path: str | os.PathLike, out_dir: str | os.PathLike, *, resolution: int = 128,
             band: float | None = None, render_size: int = 384, seed: int = 0) -> dict:
    """Mesh → sparse SDF → sparse marching cubes; writes ``<name>_d3s2.glb``, ``<name>_compare.png`` and
    ``<name>_report.json`` into ``out_dir`` and returns the report."""
    import numpy as np
    from tqdm import tqdm

    from d3s2.geometry.export import export_mesh
    from d3s2.geometry.marching_cubes import marching_cubes_mesh
    from d3s2.geometry.mesh_io import load_mesh, normalize_mesh
    from d3s2.geometry.metrics import mesh_metrics
    from d3s2.geometry.render import encode_png, render_views
    from d3s2.geometry.sdf import compute_sparse_sdf

    name = Path(mesh_path).stem
    out = Path(out_dir)  # made by the first file written into it: a failed load leaves no empty folder
    # Two voxels of band at this resolution unless given: enough for a closed band at small R.
    band = band if band is not None else 2.0 / resolution
    timings: dict[str, float] = {}
    steps = ["load", "sdf", "marching cubes", "export", "metrics", "render"]
    bar = tqdm(steps, desc=f"demo {name}", unit="step")

    def step(label: str, fn):
        bar.set_postfix_str(label)
        t0 = time.perf_counter()
        result = fn()
        timings[label] = round(time.perf_counter() - t0, 3)
        bar.update(1)
        return result

    def render_pair():
        a = render_views(source, 1, size=render_size, seed=seed, key=name).images[0]
        b = render_views(mesh, 1, size=render_size, seed=seed, key=name).images[0]
        return np.concatenate([a, b], axis=1)

    with contextlib.closing(bar):  # also on errors: a bar left open is drawn again after the error message
        source, _ = step("load", lambda: normalize_mesh(load_mesh(mesh_path)))
        sdf = step("sdf", lambda: compute_sparse_sdf(source, [resolution], band=band)[resolution])
        mesh = step("marching cubes", lambda: marching_cubes_mesh(sdf))
        glb = out / f"{name}_d3s2.glb"
        step("export", lambda: export_mesh(mesh, glb))
        metrics = step("metrics", lambda: geometry_metrics(lambda: mesh_metrics(
            mesh, source, num_samples=20_000, num_volume_points=20_000, seed=seed)))
        image = step("render", render_pair)
    png = out / f"{name}_compare.png"
    atomic_write_bytes(png, encode_png(image))
    report = {
        "input": str(mesh_path), "resolution": resolution, "band": band,
        "input_faces": int(len(source.faces)), "input_watertight": bool(source.is_watertight),
        "band_voxels": int(sdf.coords.shape[0]), "output_faces": int(len(mesh.faces)),
        "output_watertight": bool(mesh.is_watertight), "metrics": metrics, "seconds": timings,
        "outputs": {"mesh": str(glb), "compare_png": str(png)},
    }
    atomic_write_bytes(out / f"{name}_report.json", json.dumps(report, indent=2).encode())
    return report


def geometry_metrics(compute: Callable[[], dict]) -> dict:
    """``compute()`` (Chamfer, F-score, normal consistency, volume IoU) when libigl is installed; without it (the
    ``data`` extra, whose distances and winding numbers they use) ``{}`` and a warning."""
    try:
        import igl  # noqa: F401
    except ImportError:
        logger.warning("libigl is not installed: the geometry metrics are left out (pip install 'd3s2[data]')")
        return {}
    return compute()


def format_metrics(metrics: dict) -> str:
    """The metrics present, on one line."""
    labels = {"silhouette_iou": "silhouette IoU {:.3f}", "silhouette_iou_bbox": "(bbox-aligned {:.3f})",
              "chamfer_l1": "chamfer-L1 {:.4f}", "fscore@0.01": "F@0.01 {:.3f}",
              "normal_consistency": "normal consistency {:.3f}", "volume_iou": "volume IoU {:.3f}"}
    return "  ".join(fmt.format(metrics[key]) for key, fmt in labels.items() if key in metrics)


def run_generate_demo(weights: str | os.PathLike, out_dir: str | os.PathLike, *,
                      image: str | os.PathLike | None = None, example_mesh: str | os.PathLike | None = None,
                      seed: int = 0, steps: int | None = None, render_size: int = 518, progress: bool = True) -> dict:
    """Image → watertight mesh with the pipeline at ``weights`` on the CPU; exactly one of ``image`` (a file)
    and ``example_mesh`` (rendered from a fixed random view, then scored against it). Returns the report.

    The input is checked before the models load, and ``out_dir`` is made only once there is a result to write.
    """
    import numpy as np

    from d3s2.geometry.export import export_mesh
    from d3s2.geometry.mesh_io import load_mesh, normalize_mesh
    from d3s2.geometry.render import encode_png, render_views
    from d3s2.pipeline.image_to_3d import ImageTo3DPipeline, require_surface

    if (image is None) == (example_mesh is None):
        raise ValueError("expected exactly one of image and example_mesh")
    out = Path(out_dir)
    report: dict = {"weights": str(weights), "seed": seed}
    if image is not None:
        check_image(image)
        name, source, rgba = Path(image).stem, None, image
        report["input"] = str(image)
    else:
        name = Path(example_mesh).stem
        source, _ = normalize_mesh(load_mesh(example_mesh))  # the build's frame: the pipeline's output frame
        renders = render_views(source, 1, size=render_size, seed=seed, key=name)
        rgba = renders.images[0]
        report["input"] = str(out / f"{name}_input.png")
        report["example_mesh"] = str(example_mesh)
    pipe = ImageTo3DPipeline.from_pretrained(weights, progress=progress)
    mesh = require_surface(pipe(rgba, seed=seed, steps=steps, device="cpu", progress=progress))
    if source is not None:
        atomic_write_bytes(Path(report["input"]), encode_png(rgba))
    glb = out / f"{name}.glb"
    export_mesh(mesh, glb)
    report.update(resolution=pipe.resolutions[-1], faces=int(len(mesh.faces)), watertight=bool(mesh.is_watertight),
                  seconds={k: round(v, 3) for k, v in pipe.last_timing.seconds.items()},
                  outputs={"mesh": str(glb)})
    if source is not None:
        from d3s2.models.vae.task import shape_metrics
        from d3s2.pipeline.evaluate import bbox_iou, comparison_image, mask_iou, silhouette

        K, w2c = renders.intrinsics[0], renders.world_to_camera[0]
        mask = rgba[..., 3] > 0
        gen = silhouette(mesh, K, w2c, render_size, render_size)
        report["metrics"] = {"silhouette_iou": mask_iou(mask, gen), "silhouette_iou_bbox": bbox_iou(mask, gen)}
        metrics = geometry_metrics(lambda: shape_metrics(mesh, source, 20_000))
        report["metrics"].update({k: metrics[k] for k in ("chamfer_l1", "fscore@0.01", "volume_iou") if k in metrics})
        png = out / f"{name}_compare.png"
        atomic_write_bytes(png, encode_png(np.ascontiguousarray(comparison_image(rgba, mesh, K, w2c))))
        report["outputs"]["compare_png"] = str(png)
    atomic_write_bytes(out / f"{name}_report.json", json.dumps(report, indent=2).encode())
    return report


def check_image(image: str | os.PathLike) -> None:
    """ValueError (FileNotFoundError) for an input image the pipeline cannot use: missing, unreadable, too small
    or too large, or without an object to separate; the pipeline's own preprocessing decides."""
    from d3s2.models.conditioner import preprocess_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no alpha channel": the pipeline warns about it itself when it runs
        preprocess_image(image, size=32)  # small: only the checks matter here


def _run(args: argparse.Namespace) -> int:
    from d3s2.pipeline import demo_weights
    from d3s2.pipeline.image_to_3d import MAX_SEED

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"expected --steps ≥ 1, got {args.steps}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"expected --seed in [0, {MAX_SEED}], got {args.seed}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"expected --out to be a folder, got the file {args.out}")
    examples = bundled_examples()
    if args.mesh:
        path = Path(args.mesh)
    elif args.example in examples:
        path = examples[args.example]
    else:
        raise ValueError(f"unknown example {args.example!r}; expected one of {', '.join(sorted(examples))}")
    try:
        weights = demo_weights()
    except FileNotFoundError as err:
        print(f"{err}\nrunning the mesh → sparse SDF → watertight mesh demo instead (no image-to-3D)")
        return _run_mesh_demo(path, args)
    report = run_generate_demo(weights, args.out, image=args.image, example_mesh=None if args.image else path,
                               seed=args.seed, steps=args.steps, progress=bar_on_terminal())
    print(f"input  {report['input']} (weights {report['weights']}, {report['resolution']}³)")
    print(f"output {report['outputs']['mesh']}: {report['faces']} faces, watertight={report['watertight']}, "
          f"{report['seconds']['total']:.1f} s")
    if "metrics" in report:
        print(format_metrics(report["metrics"]))
        print(f"input | generated (same camera) | masks: {report['outputs']['compare_png']}")
    return 0


def _run_mesh_demo(path: Path, args: argparse.Namespace) -> int:
    report = run_demo(path, args.out, resolution=args.resolution, seed=args.seed)
    print(f"input  {report['input']}: {report['input_faces']} faces, watertight={report['input_watertight']}")
    print(f"output {report['outputs']['mesh']}: {report['output_faces']} faces, "
          f"watertight={report['output_watertight']}, {report['band_voxels']} band voxels at {report['resolution']}³")
    if report["metrics"]:
        print(format_metrics(report["metrics"]))
    print(f"side-by-side render (input | d3s2): {report['outputs']['compare_png']}")
    print("seconds: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the bundled demo on the CPU: image → 3D with the bundled demo pipeline, "
                                    "else mesh → sparse SDF → watertight mesh")
    p.add_argument("--image", help="input image for image → 3D (default: a render of --example)")
    p.add_argument("--example", default=DEFAULT_EXAMPLE, help="bundled example mesh (default: %(default)s)")
    p.add_argument("--mesh", help="use this mesh file instead of a bundled example")
    p.add_argument("--out", default="out/demo", help="output folder (default: %(default)s)")
    p.add_argument("--resolution", type=int, default=128,
                   help="SDF resolution of the mesh demo, a multiple of 8 (image → 3D uses the pipeline's)")
    p.add_argument("--steps", type=int, default=None, help="image → 3D sampling steps (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the generation and of the example's camera (default 0)")
    p.set_defaults(func=_run)

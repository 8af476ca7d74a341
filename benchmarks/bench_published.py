"""The published Direct3D-S2 v1.1 pipeline structure with synthetic weights, end to end: time and peak memory.

Components: a synthetic published folder (``config.yaml`` + ``model_*.ckpt`` with exactly the published v1.1
keys, shapes and dtypes, random values; ``tests/pipeline/synthetic.py``) loaded by
:func:`d3s2.pipeline.published.load_published` in bf16, and a random DINOv2 ViT-L/14-reg4 (transformers).
Pipeline: :class:`~d3s2.pipeline.image_to_3d.ImageTo3DPipeline` with the published settings
(``PipelineSettings.from_published``): dense 50 steps, sparse 30 (512³) and 15 (1024³) steps, CFG 7, shifts
6/6/8, the 512³ ``VoxelRefinerXL`` on the SDF + 32-channel decoder features, the chunked 1024³ decode and the
1024³ sign refiner. Models stay on the GPU (no low-VRAM offloading); the 512³ run has only the 512³ models
on the GPU, the 1024³ run all of them.

Synthetic weights do not decide any cost except two, which are pinned to realistic values:
- token sets: random dense weights give a random occupancy, so each sparse stage takes a real 0 A.D. layout
  from ``latent_layouts_1024.npz`` (``structure=``; 512³ = the 1024³ layout halved);
- surfaces: random decoders and refiners give noise fields whose iso-surface fills every decoded voxel. The
  SS-VAE output layers and the 512³ refiner's last adaptive filter are zeroed (constant "inside" values: all
  the convolutions still run), so the mesh is the boundary of the decoded blocks, a surface of the object's
  size.

    python benchmarks/bench_published.py --layouts /path/latent_layouts_1024.npz --out-dir $OUT   # GPU
    python benchmarks/bench_published.py --tiny --device cpu --out-dir /tmp/x                     # CPU smoke

``--tiny``: the tiny random pipeline of tests/pipeline/tiny.py at 64³ / 128³ with tiny refiners and the
published settings (the published step counts unless ``--steps``), on the layouts file if given.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import (
    DEFAULT_LAYOUTS,
    ROOT,
    environment,
    gib,
    load_layouts,
    random_dino,
    rgba_disc,
    tiny_shell_layouts,
    write_outputs,
)

PUBLISHED_NEEDS_GB = {512: "at least 10 GB", 1024: "about 24 GB"}  # the published README


def build_published(device: str, dtype: torch.dtype, workdir: Path) -> tuple[object, dict]:
    """The v1.1 pipeline from a synthetic published folder, loaded on the CPU in ``dtype`` (each stage's models
    move to ``device`` when it first runs), and a random DINOv2 built on ``device``."""
    sys.path.insert(0, str(ROOT))
    from tests.pipeline.synthetic import write_published_folder

    from d3s2.pipeline.image_to_3d import ImageTo3DPipeline, PipelineSettings
    from d3s2.pipeline.published import load_published

    info = {}
    t0 = time.perf_counter()
    folder = write_published_folder(workdir / "direct3d-s2-v-1-1", "v1.1")
    info["write_synthetic_folder_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    models = load_published(folder, dtype=dtype)
    info["load_published_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    enc, info["conditioner"] = random_dino(device)
    info["conditioner_random_init_s"] = round(time.perf_counter() - t0, 2)
    info["parameters_m"] = {n: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
                            for n, m in {**models.models, "conditioner": enc}.items()}
    settings = PipelineSettings.from_published(models.defaults)
    return ImageTo3DPipeline.from_components(models.models, conditioner=enc, settings=settings), info


def build_tiny() -> object:
    """tests/pipeline/tiny.py's pipeline with tiny refiners (as tests/pipeline/test_refine.py) and published
    settings."""
    sys.path.insert(0, str(ROOT))
    from tests.pipeline.tiny import TINY_OCCUPANCY_THRESHOLD, tiny_pipeline

    from d3s2.models.refiner import VoxelRefinerXL, VoxelRefinerXLSign
    from d3s2.pipeline.image_to_3d import ImageTo3DPipeline, PipelineSettings
    from d3s2.pipeline.published import PublishedDefaults

    base = tiny_pipeline()
    small = dict(block_channels=[2, 4], norm_groups=2, layers_per_block=1, layers_mid_block=1)
    refiners = {64: VoxelRefinerXL(VoxelRefinerXL.Config(**small, feature_channels=8, feature_hidden=8,
                                                         patch_size=24, patch_stride=20)),
                128: VoxelRefinerXLSign(VoxelRefinerXLSign.Config(**small, patch_size=32, patch_stride=32))}
    settings = PipelineSettings.from_published(PublishedDefaults(version="v1.1"))
    settings.occupancy_threshold = TINY_OCCUPANCY_THRESHOLD
    return ImageTo3DPipeline(base.conditioner, base.dense_dit, base.dense_vae, base.sparse_dits, base.sparse_vaes,
                             settings, refiners)


def pin_surfaces(pipe) -> None:
    """Constant decoded values (-0.46, inside at both levels) and a zero 512³ refiner output (inside at 0.4):
    the mesh becomes the boundary of the decoded blocks instead of a noise surface through every voxel."""
    from d3s2.models.refiner import VoxelRefinerXL

    with torch.no_grad():
        for vae in pipe.sparse_vaes.values():
            vae.decoder.out_layer.weight.zero_()
            vae.decoder.out_layer.bias.fill_(-0.5)
        for ref in pipe.refiners.values():
            if isinstance(ref, VoxelRefinerXL):
                ref.adaptive_conv3[-1].weight.zero_()  # zero filter weights → zero output → tanh 0


def run(pipe, resolution: int, structure: dict[int, torch.Tensor], args, steps: int | None) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    mesh = pipe(rgba_disc(), resolution=resolution, seed=args.seed, steps=steps, device=device,
                dtype=args.torch_dtype, progress=False,
                structure={r: c for r, c in structure.items() if r <= resolution})
    t = pipe.last_timing
    row = {"resolution": resolution, "seconds": {k: round(v, 3) for k, v in t.seconds.items()},
           "tokens": {str(k): v for k, v in t.tokens.items()},
           "decoded_voxels": {str(k): v for k, v in t.voxels.items()},
           "faces": int(len(mesh.faces)), "watertight": bool(mesh.is_watertight)}
    if device.type == "cuda":
        row["peak_gib"] = {k: gib(v) for k, v in t.peak_bytes.items()}
        row["weights_on_gpu_gib"] = gib(sum(p.numel() * p.element_size() for m in pipe.components().values()
                                            for p in m.parameters() if p.device.type == "cuda"))
    return row


def markdown(result: dict) -> str:
    lines = [f"# Published v1.1 pipeline structure, synthetic weights ({result['device']})", "",
             f"`{result['command']}`", "",
             f"commit {result['commit'][:10]}, torch {result['torch']}, triton {result['triton']}, {result['date']}, "
             f"dtype {result['dtype']}, steps {result['steps']}, CFG {result['cfg']}, layout "
             f"{result['layout']}", ""]
    runs = result["runs"]
    names = []
    for r in runs:
        names += [n for n in r["seconds"] if n not in names and n != "total"]
    names.append("total")
    head = "| stage | " + " | ".join(f"{r['resolution']}³ s | {r['resolution']}³ peak GiB" for r in runs) + " |"
    lines += [head, "|---|" + "---:|---:|" * len(runs)]
    for n in names:
        cells = []
        for r in runs:
            s = r["seconds"].get(n)
            p = r.get("peak_gib", {}).get(n)
            cells += ["" if s is None else f"{s:.2f}", "" if p is None else f"{p:.2f}"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in runs:
        res = r["resolution"]
        peak = r.get("peak_gib", {}).get("total")
        lines.append(f"- {res}³: tokens {r['tokens']}, decoded voxels {r['decoded_voxels']}, {r['faces']} faces "
                     f"(watertight {r['watertight']}); peak {peak} GiB"
                     + (f" with {r['weights_on_gpu_gib']} GiB of weights on the GPU" if peak is not None else "")
                     + f"; the published code states {PUBLISHED_NEEDS_GB.get(res, 'nothing')} for {res}³.")
    lines += ["", "Peaks are torch.cuda.max_memory_allocated per stage (weights included; the CUDA caching "
              "allocator reserves somewhat more). The published figures are from its README (§7 of "
              "published-implementation.md): fp16, torchsparse + flash-attn, dense 512³ refiner features.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random pipeline, CPU smoke test")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default bf16 on CUDA")
    ap.add_argument("--layouts", default=None, help=f"latent_layouts_1024.npz (full size default {DEFAULT_LAYOUTS})")
    ap.add_argument("--layout", default="32768", help="key in the layouts file (32768 → 32,721 tokens at 1024³)")
    ap.add_argument("--resolutions", type=int, nargs="+", default=None, help="default: every stage (512 1024)")
    ap.add_argument("--steps", type=int, default=None, help="override every stage's steps (default: published)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the 1-step warm-up run (Triton compilation)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=None, help="default $OUT, else benchmarks/results")
    args = ap.parse_args()
    from _common import default_out_dir

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    cuda = args.device.startswith("cuda")
    args.torch_dtype = dtypes[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="d3s2-published-") as tmp:
        if args.tiny:
            pipe, info = build_tiny(), {}
        else:
            pipe, info = build_published(args.device, args.torch_dtype, Path(tmp))
        pin_surfaces(pipe)
        layouts_path = args.layouts or (None if args.tiny else DEFAULT_LAYOUTS)
        if layouts_path:
            structure = load_layouts(layouts_path, args.layout, pipe.resolutions)
        else:
            structure = tiny_shell_layouts(pipe)
        resolutions = args.resolutions or pipe.resolutions
        print(json.dumps({"build": info, "tokens": {r: int(c.shape[0]) for r, c in structure.items()}}), flush=True)
        if not args.no_warmup:
            t0 = time.perf_counter()
            run(pipe, resolutions[0], structure, args, steps=1)
            info["warmup_s"] = round(time.perf_counter() - t0, 2)
        s = pipe.settings
        result = {**environment(args.device), "tiny": args.tiny,
                  "dtype": str(args.torch_dtype).removeprefix("torch."),
                  "layout": args.layout if layouts_path else "ball shell", "build": info,
                  "steps": {"dense": args.steps or s.dense.steps,
                            **{str(r): args.steps or s.stage(r).steps for r in pipe.resolutions}},
                  "cfg": s.dense.guidance_scale, "refine": s.refine,
                  "decode_chunk": {str(r): s.chunk(r) for r in pipe.resolutions}, "runs": []}
        stem = f"published_{'tiny_' if args.tiny else ''}{args.device.split(':')[0]}"
        for r in resolutions:
            row = run(pipe, r, structure, args, steps=args.steps)
            print(json.dumps(row), flush=True)
            result["runs"].append(row)
            # Written after every run: a run cut off by a time limit keeps the earlier ones.
            paths = write_outputs(args.out_dir or default_out_dir(), stem, result, markdown(result))
    for p in paths:
        print(f"wrote {p}")


if __name__ == "__main__":
    main()

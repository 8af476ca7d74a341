"""End-to-end image → mesh timing and peak memory at 512³ and 1024³ with full-size random-weight models.

Models: the published v1.1 architectures (DINOv2 ViT-L/14-reg4 at 518², dense DiT + dense VAE, sparse DiT 512 /
1024 + SS-VAE), random weights, bf16 on CUDA. Sampling: the published step counts (dense 50, sparse 512³ 30,
sparse 1024³ 15) and CFG 7. Token sets: a real 0 A.D. layout from ``latent_layouts_1024.npz`` for the 1024³
stage and the same layout halved (unique ``coords // 2``) for the 512³ stage, passed as ``structure=`` so that
random weights do not decide the token counts. Random decoders give noisy fields, so the decode / mesh timings
are upper bounds for trained models (more surface). The cascade index (a band SDF at 1024³) is timed separately
on the largest component of the 512³ mesh unless ``--skip-index``.

    python benchmarks/bench_generate.py                     # GPU, full size, writes benchmarks/results/
    python benchmarks/bench_generate.py --tiny --device cpu # smoke test, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DEFAULT_LAYOUTS = "/work/shared/data/latent_layouts_1024.npz"


def build_full(device: str):
    from d3s2.models.conditioner import DinoV2Encoder
    from d3s2.models.dit import DenseDiT, SparseDiT
    from d3s2.models.vae import DenseShapeVAE, SparseSDFVAE
    from d3s2.pipeline.image_to_3d import ImageTo3DPipeline

    with torch.device(device):  # build on the device: no 2 GB of CPU init per model
        enc = DinoV2Encoder.random()
        models = dict(dense_dit=DenseDiT(), dense_vae=DenseShapeVAE(),
                      dits={512: SparseDiT(SparseDiT.Config.v1_1(512)), 1024: SparseDiT(SparseDiT.Config.v1_1(1024))},
                      vaes={512: SparseSDFVAE(), 1024: SparseSDFVAE()})
    return ImageTo3DPipeline(enc, models["dense_dit"], models["dense_vae"], models["dits"], models["vaes"])


def build_tiny():
    sys.path.insert(0, str(ROOT / "tests"))
    from pipeline.tiny import tiny_pipeline

    return tiny_pipeline()


def perturb_outputs(pipe, seed: int) -> None:
    """Zero-initialised output layers would make every velocity and SDF zero: give them random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in [pipe.dense_dit, *pipe.sparse_dits.values()]:
            w = m.out_layer.weight
            w.copy_((torch.randn(w.shape, generator=g) * 0.02).to(w))
        for v in pipe.sparse_vaes.values():
            w = v.decoder.out_layer.weight
            w.copy_((torch.randn(w.shape, generator=g) * 0.05).to(w))


def layouts(path: str, key: str, resolutions: list[int]) -> dict[int, torch.Tensor]:
    data = np.load(path)
    if key not in data:
        raise SystemExit(f"{path}: no layout {key!r}; expected one of {sorted(data.keys())}")
    c1024 = torch.from_numpy(data[key].astype(np.int32))
    out = {}
    for r in resolutions:
        f = 1024 // r
        out[r] = torch.unique(torch.div(c1024, f, rounding_mode="floor"), dim=0) if f > 1 else c1024
    return out


def tiny_layouts(pipe) -> dict[int, torch.Tensor]:
    """A ball shell at each tiny resolution (no shared data needed)."""
    out = {}
    for r in pipe.resolutions:
        g = r // 8
        ax = torch.arange(g)
        c = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
        d = ((c.float() + 0.5) / g * 2 - 1).norm(dim=1)
        out[r] = c[(d - 0.6).abs() < 1.5 / g].to(torch.int32)
    return out


def image() -> np.ndarray:
    img = np.zeros((512, 512, 4), np.uint8)
    yy, xx = np.mgrid[:512, :512]
    disc = (yy - 256) ** 2 + (xx - 256) ** 2 < 180**2
    img[disc] = (180, 120, 60, 255)
    return img


def run_one(pipe, resolution: int, structure: dict[int, torch.Tensor], args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    mesh = pipe(image(), resolution=resolution, seed=args.seed, device=device, dtype=args.torch_dtype,
                progress=False, low_vram=args.low_vram,
                structure={r: c for r, c in structure.items() if r <= resolution})
    wall = time.perf_counter() - t0
    row = {"resolution": resolution, "end_to_end_s": round(wall, 3),
           "stages_s": {k: round(v, 3) for k, v in pipe.last_timing.seconds.items()},
           "tokens": {str(k): v for k, v in pipe.last_timing.tokens.items()},
           "decoded_voxels": {str(k): v for k, v in pipe.last_timing.voxels.items()},
           "faces": int(len(mesh.faces)), "watertight": bool(mesh.is_watertight)}
    if device.type == "cuda":
        row["peak_vram_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return row, mesh


def time_index(pipe, mesh, resolution: int, device: str) -> dict:
    from d3s2.pipeline.extract import drop_small_components

    mesh = drop_small_components(mesh, pipe.settings.min_component_fraction)
    if len(mesh.faces) == 0:
        return {"skipped": "empty mesh"}
    t0 = time.perf_counter()
    coords = pipe._cascade_index(mesh, resolution, torch.device(device))
    return {"resolution": resolution, "seconds": round(time.perf_counter() - t0, 3), "mesh_faces": len(mesh.faces),
            "tokens": int(coords.shape[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random pipeline (tests/pipeline/tiny.py), CPU smoke")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default bf16 on CUDA")
    ap.add_argument("--layouts", default=DEFAULT_LAYOUTS)
    ap.add_argument("--layout", default="32768", help="key in the layouts file (32768 → 32,721 tokens at 1024³)")
    ap.add_argument("--resolutions", type=int, nargs="+", default=None, help="default: every stage (512 1024)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per resolution; the first is warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--low-vram", action="store_true")
    ap.add_argument("--skip-index", action="store_true", help="do not time the cascade index on the 512³ mesh")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/generate_<device>.json)")
    args = ap.parse_args()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    args.torch_dtype = dtypes[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                              else torch.float32)
    torch.manual_seed(args.seed)
    pipe = build_tiny() if args.tiny else build_full(args.device)
    if not args.tiny:
        perturb_outputs(pipe, args.seed)
    resolutions = args.resolutions or pipe.resolutions
    structure = tiny_layouts(pipe) if args.tiny else layouts(args.layouts, args.layout, pipe.resolutions)
    rows, index = [], None
    for r in resolutions:
        for rep in range(args.repeats):
            row, mesh = run_one(pipe, r, structure, args)
            row["repeat"] = rep
            print(json.dumps(row), flush=True)
            rows.append(row)
        if r == pipe.resolutions[0] and len(pipe.resolutions) > 1 and not args.skip_index:
            index = time_index(pipe, mesh, pipe.resolutions[1], args.device)
            print(json.dumps({"cascade_index": index}), flush=True)
    dev = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor() or "cpu"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = {"device": dev, "torch": torch.__version__, "triton": triton_version, "commit": commit,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "tiny": args.tiny, "dtype": str(args.torch_dtype).removeprefix("torch."),
              "layout": None if args.tiny else args.layout, "low_vram": args.low_vram,
              "steps": {"dense": pipe.settings.dense.steps,
                        **{str(r): pipe.settings.stage(r).steps for r in pipe.resolutions}},
              "cfg": pipe.settings.dense.guidance_scale, "command": " ".join(sys.argv), "runs": rows,
              "cascade_index": index}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"generate_{'tiny_' if args.tiny else ''}"
               f"{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

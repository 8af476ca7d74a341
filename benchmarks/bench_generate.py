"""End-to-end image → mesh timing and peak memory at 512³ and 1024³ with full-size random-weight models.

Models: the published v1.1 architectures (DINOv2 ViT-L/14-reg4 at 518², dense DiT + dense VAE, sparse DiT 512 /
1024 + SS-VAE), random weights, bf16 on CUDA. Sampling: the published step counts (dense 50, sparse 512³ 30,
sparse 1024³ 15) and CFG 7. Token sets: a real 0 A.D. layout from ``latent_layouts_1024.npz`` for the 1024³
stage and the same layout halved (unique ``coords // 2``) for the 512³ stage, passed as ``structure=`` so that
random weights do not decide the token counts. A random decoder gives a noise field whose surface runs through
every decoded voxel; the SS-VAE output layers are set to a constant "inside" value instead (all convolutions
still run), so the mesh is the boundary of the decoded blocks, a surface of the object's size. The cascade
index (a band SDF at 1024³) is timed separately on the largest component of the 512³ mesh unless
``--skip-index``. bench_published.py runs the published structure (published loader, refiners).

    python benchmarks/bench_generate.py --layouts PATH --out-dir $OUT   # GPU, full size
    python benchmarks/bench_generate.py --tiny --device cpu             # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from _common import (
    DEFAULT_LAYOUTS,
    ROOT,
    default_out_dir,
    environment,
    gib,
    load_layouts,
    random_dino,
    rgba_disc,
    tiny_shell_layouts,
    write_outputs,
)


def build_full(device: str):
    from d3s2.models.dit import DenseDiT, SparseDiT
    from d3s2.models.vae import DenseShapeVAE, SparseSDFVAE
    from d3s2.pipeline.image_to_3d import ImageTo3DPipeline

    enc, _ = random_dino(device)
    with torch.device(device):  # build on the device: no 2 GB of CPU init per model
        models = dict(dense_dit=DenseDiT(), dense_vae=DenseShapeVAE(),
                      dits={512: SparseDiT(SparseDiT.Config.v1_1(512)), 1024: SparseDiT(SparseDiT.Config.v1_1(1024))},
                      vaes={512: SparseSDFVAE(), 1024: SparseSDFVAE()})
    return ImageTo3DPipeline(enc, models["dense_dit"], models["dense_vae"], models["dits"], models["vaes"])


def build_tiny():
    sys.path.insert(0, str(ROOT))
    from tests.pipeline.tiny import tiny_pipeline

    return tiny_pipeline()


def set_outputs(pipe, seed: int) -> None:
    """Zero-initialised DiT output layers would make every velocity zero: give them random values. SS-VAE
    output: a constant inside value (tanh(-0.5)), see the module docstring."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in [pipe.dense_dit, *pipe.sparse_dits.values()]:
            w = m.out_layer.weight
            w.copy_((torch.randn(w.shape, generator=g) * 0.02).to(w))
        for v in pipe.sparse_vaes.values():
            v.decoder.out_layer.weight.zero_()
            v.decoder.out_layer.bias.fill_(-0.5)


def run_one(pipe, resolution: int, structure: dict[int, torch.Tensor], args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    mesh = pipe(rgba_disc(), resolution=resolution, seed=args.seed, steps=args.steps, device=device,
                dtype=args.torch_dtype, progress=False, low_vram=args.low_vram, residency=args.residency,
                structure={r: c for r, c in structure.items() if r <= resolution})
    wall = time.perf_counter() - t0
    row = {"resolution": resolution, "end_to_end_s": round(wall, 3),
           "stages_s": {k: round(v, 3) for k, v in pipe.last_timing.seconds.items()},
           "tokens": {str(k): v for k, v in pipe.last_timing.tokens.items()},
           "decoded_voxels": {str(k): v for k, v in pipe.last_timing.voxels.items()},
           "faces": int(len(mesh.faces)), "watertight": bool(mesh.is_watertight)}
    if device.type == "cuda":
        # The pipeline resets the CUDA peak counter per stage, so the run's peak is the largest stage peak.
        peak = max([torch.cuda.max_memory_allocated(device), *pipe.last_timing.peak_bytes.values()])
        row["peak_vram_gib"] = round(peak / 2**30, 3)
        row["stage_peak_gib"] = {k: gib(v) for k, v in pipe.last_timing.peak_bytes.items()}
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
    ap.add_argument("--layouts", default=None, help=f"latent_layouts_1024.npz (full size default {DEFAULT_LAYOUTS}; "
                    "--tiny: a ball shell unless given)")
    ap.add_argument("--layout", default="32768", help="key in the layouts file (32768 → 32,721 tokens at 1024³)")
    ap.add_argument("--resolutions", type=int, nargs="+", default=None, help="default: every stage (512 1024)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per resolution; the first is warm-up")
    ap.add_argument("--steps", type=int, default=None, help="override every stage's steps (default: published)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--low-vram", action="store_true")
    ap.add_argument("--residency", choices=["prefetch", "resident", "low_vram"], default=None,
                    help="where the weights live during a call (default: prefetch on CUDA)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="sample eagerly (no CUDA-graph replay)")
    ap.add_argument("--skip-index", action="store_true", help="do not time the cascade index on the 512³ mesh")
    ap.add_argument("--label", default="", help="appended to the output file names (e.g. eager)")
    ap.add_argument("--out-dir", default=None, help="default $OUT, else benchmarks/results")
    args = ap.parse_args()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    args.torch_dtype = dtypes[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                              else torch.float32)
    torch.manual_seed(args.seed)
    pipe = build_tiny() if args.tiny else build_full(args.device)
    if not args.tiny:
        set_outputs(pipe, args.seed)
    pipe.cuda_graphs = False if args.no_cuda_graphs else None
    resolutions = args.resolutions or pipe.resolutions
    layouts_path = args.layouts or (None if args.tiny else DEFAULT_LAYOUTS)
    structure = load_layouts(layouts_path, args.layout, pipe.resolutions) if layouts_path else tiny_shell_layouts(pipe)
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
    result = {**environment(args.device), "tiny": args.tiny, "dtype": str(args.torch_dtype).removeprefix("torch."),
              "layout": args.layout if layouts_path else "ball shell", "low_vram": args.low_vram,
              "residency": args.residency or ("low_vram" if args.low_vram
                                              else "prefetch" if args.device.startswith("cuda") else "resident"),
              "cuda_graphs": not args.no_cuda_graphs,
              "steps": {"dense": args.steps or pipe.settings.dense.steps,
                        **{str(r): args.steps or pipe.settings.stage(r).steps for r in pipe.resolutions}},
              "cfg": pipe.settings.dense.guidance_scale, "runs": rows, "cascade_index": index}
    stem = f"generate_{'tiny_' if args.tiny else ''}{args.device.split(':')[0]}{'_' + args.label if args.label else ''}"
    for p in write_outputs(args.out_dir or default_out_dir(), stem, result, markdown(result)):
        print(f"wrote {p}")


def markdown(result: dict) -> str:
    lines = [f"# d3s2 image → mesh, random weights ({result['device']})", "", f"`{result['command']}`", "",
             f"commit {result['commit'][:10]}, torch {result['torch']}, {result['date']}, dtype {result['dtype']}, "
             f"steps {result['steps']}, CFG {result['cfg']}, layout {result['layout']}, "
             f"CUDA graphs {result.get('cuda_graphs')}, weights {result.get('residency')}", "",
             "| resolution | repeat | end to end s | peak GiB | tokens | faces | stages s | stage peaks GiB |",
             "|---:|---:|---:|---:|---|---:|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['resolution']} | {r['repeat']} | {r['end_to_end_s']} | {r.get('peak_vram_gib', '')} | "
                     f"{r['tokens']} | {r['faces']} | {r['stages_s']} | {r.get('stage_peak_gib', '')} |")
    if result["cascade_index"]:
        lines += ["", f"Cascade index: {result['cascade_index']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

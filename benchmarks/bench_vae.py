"""SS-VAE at full size on real meshes: encode / decode time and peak memory at 512³ and 1024³ (chunked decode),
one training step at 512³, and a 1024³ training step with batch 1 (target: ≤ 40 GB).

Model: configs/vae/ss_vae_512.yaml (the published v1.1 architecture, 37.9 M parameters) for 512³ and
configs/vae/ss_vae_1024.yaml (same weights layout; training decodes one random 32³-latent sub-volume, inference
decodes in 32³-latent chunks) for 1024³, random weights (costs do not depend on them). Input: the band SDF
(τ = 1/128 by default, 2 voxels at 512³ and 4 at 1024³) of real 0 A.D. meshes computed on the device
(:func:`d3s2.geometry.sdf.compute_sparse_sdf`), as ``d3s2 data build`` would store it. Inference runs under
bf16 autocast with fp32 weights (as validation in the trainer); a training step is forward + loss + backward
+ gradient clipping + AdamW under bf16 autocast, timed after one warm-up step. The 1024³ step runs without
activation checkpointing first and, if that is out of memory or above the target (or ``--checkpointing
on``), with the trainer's activation checkpointing of every down, transformer and subdivide block.

    python benchmarks/bench_vae.py --corpus /path/0ad_meshes.npz --out-dir $OUT      # GPU, 2 real meshes
    python benchmarks/bench_vae.py --tiny --device cpu --out-dir /tmp/x             # CPU smoke (sphere)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch
from _common import Meter, default_out_dir, environment, write_outputs

from d3s2.config import PACKAGED_CONFIGS

DEFAULT_CORPUS = "/work/shared/data/0ad_meshes.npz"
# Two of the layout meshes of latent_layouts_1024.npz: 32,721 and 66,353 latent tokens at 1024³.
DEFAULT_ASSETS = ["skeletal/new/m_hero_caros", "props/rome_blacksmith_barrels"]
TARGET_1024_TRAIN_GB = 40
CHECKPOINTED = ["SparseDownBlock3d", "SparseWindowTransformerBlock", "SparseSubdivideBlock3d"]


def load_meshes(args) -> list[tuple[str, object]]:
    from d3s2.geometry.mesh_io import load_mesh, normalize_mesh

    if args.tiny and not args.mesh:
        import trimesh

        return [("icosphere", trimesh.creation.icosphere(subdivisions=3, radius=0.8))]
    if args.mesh:
        return [(os.path.basename(p), normalize_mesh(load_mesh(p), 0.95)[0]) for p in args.mesh]
    from d3s2.data.corpus import MeshCorpus

    corpus = MeshCorpus(args.corpus)
    return [(name, normalize_mesh(corpus.mesh(name), 0.95)[0]) for name in args.assets]


def build_vae(config_path: str, device: str, overrides: dict | None = None):
    from d3s2.models.registry import build_model
    from d3s2.models.vae.task import load_model_config

    name, model_args = load_model_config(config_path, overrides or {})
    with torch.device(device):
        return build_model(name, model_args)


def make_batch(sdf, band: float, device: str):
    from d3s2.models.vae import SparseSDFBatch

    blocks, target = sdf.block_targets()

    def t(a):
        return torch.from_numpy(a).to(device)

    # Built on the device: at 1024³ the target holds ~10⁷ voxels.
    return SparseSDFBatch.from_samples([t(sdf.coords)], [t(sdf.sdf)], [t(blocks)], [t(target)],
                                       resolution=sdf.resolution, sharp=[t(sdf.sharp)], tau=band)


def autocast(device: str):
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def inference(model, batch, chunk: int, meter: Meter, tag: str, device: str) -> dict:
    model.eval()
    with torch.no_grad(), autocast(device):
        with meter(f"encode {tag}"):
            z, _ = model.encode(batch.sdf, sample_posterior=False)
        with meter(f"decode {tag}"):
            out = model.decode(z, chunk_size=chunk)
    return {"band_voxels": batch.sdf.num_voxels, "latent_tokens": z.num_voxels, "decoded_voxels": out.num_voxels,
            "decode_chunk": chunk}


def train_steps(model, batch, meter: Meter, tag: str, device: str, steps: int = 2) -> dict:
    """``steps`` AdamW steps; the last is timed (the first ones compile kernels and allocate the optimizer)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    logs = {}
    for i in range(steps):
        with meter(tag) if i == steps - 1 else contextlib.nullcontext():
            with autocast(device):
                out = model(batch)
                loss, logs = model.loss(out, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    del opt
    return {"loss": float(loss.detach()), "decoded_voxels": out.decoded.num_voxels,
            **{k: float(v) for k, v in logs.items() if torch.is_tensor(v) and v.numel() == 1}}


def train_1024(args, batch, meter: Meter) -> list[dict]:
    """The 1024³ batch-1 step: plain, then with activation checkpointing when needed (or asked)."""
    from d3s2.train.distributed import apply_activation_checkpointing

    rows = []
    modes = {"off": [False], "on": [True], "auto": [False, True], "both": [False, True]}[args.checkpointing]
    for ckpt in modes:
        tag = f"train {args.res_hi}" + (" checkpointed" if ckpt else "")
        model = build_vae(args.config_hi, args.device, args.hi_overrides)
        if ckpt:
            apply_activation_checkpointing(model, CHECKPOINTED)
        try:
            row = {"step": tag, "activation_checkpointing": CHECKPOINTED if ckpt else [],
                   **train_steps(model, batch, meter, tag, args.device)}
        except torch.cuda.OutOfMemoryError as err:
            row = {"step": tag, "oom": str(err).splitlines()[0]}
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        rows.append(row)
        peak = meter.rows.get(tag, {}).get("peak_gib")
        fits = peak is not None and peak <= TARGET_1024_TRAIN_GB
        if args.checkpointing == "auto" and "oom" not in row and (fits or not args.device.startswith("cuda")):
            break
    return rows


def markdown(result: dict) -> str:
    lines = [f"# SS-VAE benchmark ({result['device']})", "", f"`{result['command']}`", "",
             f"commit {result['commit'][:10]}, torch {result['torch']}, triton {result['triton']}, {result['date']}; "
             f"band τ = {result['band']:.5f}; configs {result['configs']}", ""]
    lines += ["| mesh | resolution | band voxels | latent tokens | decoded voxels | SDF s |",
              "|---|---:|---:|---:|---:|---:|"]
    for m in result["meshes"]:
        for r, d in m["resolutions"].items():
            lines.append(f"| {m['name']} | {r} | {d['band_voxels']:,} | {d['latent_tokens']:,} | "
                         f"{d['decoded_voxels']:,} | {m['sdf_s']:.2f} |")
    lines += ["", "| measurement | seconds | peak GiB | start GiB |", "|---|---:|---:|---:|"]
    for name, row in result["timings"].items():
        lines.append(f"| {name} | {row['seconds']:.3f} | {row.get('peak_gib', '')} | {row.get('start_gib', '')} |")
    lines.append("")
    for row in result["train_1024"]:
        if "oom" in row:
            lines.append(f"- {row['step']}: out of memory ({row['oom']})")
    peaks = [result["timings"].get(r["step"], {}).get("peak_gib") for r in result["train_1024"] if "oom" not in r]
    peaks = [p for p in peaks if p is not None]
    if peaks:
        met = "met" if min(peaks) <= TARGET_1024_TRAIN_GB else "missed"
        lines.append(f"- 1024³ training step, batch 1: lowest peak {min(peaks)} GiB (target ≤ "
                     f"{TARGET_1024_TRAIN_GB} GB): {met}.")
    lines += ["- Encode/decode: bf16 autocast, fp32 weights, posterior mode; peaks are "
              "torch.cuda.max_memory_allocated during the block (start GiB: allocated before it, i.e. weights, "
              "inputs and, for decode, the latent).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny config at 32³/64³ on an icosphere (CPU smoke)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--corpus", default=os.environ.get("D3S2_0AD_NPZ", DEFAULT_CORPUS))
    ap.add_argument("--assets", nargs="+", default=DEFAULT_ASSETS, help="corpus mesh names")
    ap.add_argument("--mesh", nargs="+", default=None, help="mesh files instead of corpus assets")
    ap.add_argument("--band", type=float, default=1 / 128, help="τ in [-1, 1] units (d3s2 data build default)")
    ap.add_argument("--checkpointing", choices=["auto", "on", "off", "both"], default="auto",
                    help="activation checkpointing for the 1024³ training step")
    ap.add_argument("--skip-train-1024", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=None, help="default $OUT, else benchmarks/results")
    args = ap.parse_args()
    from d3s2.geometry.sdf import compute_sparse_sdf

    torch.manual_seed(args.seed)
    if args.tiny:
        args.res_lo, args.res_hi = 32, 64
        args.config_lo = args.config_hi = str(PACKAGED_CONFIGS / "debug" / "tiny_vae.yaml")
        chunk_hi = 8  # one chunk: the chunked code path without the halo recomputation of a tiny grid
        args.hi_overrides = {"train_chunk_size": 8}  # the 1024 config's random-chunk training decode
    else:
        args.res_lo, args.res_hi = 512, 1024
        args.config_lo = str(PACKAGED_CONFIGS / "vae" / "ss_vae_512.yaml")
        args.config_hi = str(PACKAGED_CONFIGS / "vae" / "ss_vae_1024.yaml")
        chunk_hi = 32
        args.hi_overrides = {}
    meter = Meter(args.device)
    cuda = args.device.startswith("cuda")
    meshes, batches = [], {}
    result = {**environment(args.device), "tiny": args.tiny, "band": args.band,
              "configs": [os.path.relpath(c, PACKAGED_CONFIGS.parent) for c in (args.config_lo, args.config_hi)],
              "train_mesh": None, "meshes": meshes, "timings": meter.rows, "train_lo": None, "train_1024": []}
    stem = f"vae_{'tiny_' if args.tiny else ''}{args.device.split(':')[0]}"

    def emit() -> list:
        # Written after every section: a run cut off by a time limit keeps what it measured.
        return write_outputs(args.out_dir or default_out_dir(), stem, result, markdown(result))

    for name, mesh in load_meshes(args):
        t0 = time.perf_counter()
        sdfs = compute_sparse_sdf(mesh, [args.res_lo, args.res_hi], band=args.band, device=args.device,
                                  backend="torch" if cuda else "igl")
        sdf_s = time.perf_counter() - t0
        batches[name] = {r: make_batch(s, args.band, args.device) for r, s in sdfs.items()}
        meshes.append({"name": name, "faces": int(len(mesh.faces)), "sdf_s": round(sdf_s, 2), "resolutions": {}})
        print(json.dumps({"mesh": name, "sdf_s": round(sdf_s, 2),
                          "band_voxels": {r: len(s) for r, s in sdfs.items()}}), flush=True)

    model = build_vae(args.config_lo, args.device)
    first = result["train_mesh"] = meshes[0]["name"]
    inference(model, batches[first][args.res_lo], 0, Meter(args.device), "warmup", args.device)  # compile kernels
    for m in meshes:
        for r, chunk in ((args.res_lo, 0), (args.res_hi, chunk_hi)):
            m["resolutions"][str(r)] = inference(model, batches[m["name"]][r], chunk, meter, f"{r} {m['name']}",
                                                 args.device)
        print(json.dumps({k: v for k, v in meter.rows.items() if m["name"] in k}), flush=True)
        emit()
    tag = f"train {args.res_lo}"
    train_lo = result["train_lo"] = {"step": tag, **train_steps(model, batches[first][args.res_lo], meter, tag,
                                                                args.device)}
    print(json.dumps({"train": train_lo, **meter.rows[f"train {args.res_lo}"]}), flush=True)
    emit()
    del model
    if cuda:
        torch.cuda.empty_cache()
    if not args.skip_train_1024:
        result["train_1024"] = train_1024(args, batches[first][args.res_hi], meter)
    for row in result["train_1024"]:
        print(json.dumps({**row, **meter.rows.get(row["step"], {})}), flush=True)
    for p in emit():
        print(f"wrote {p}")


if __name__ == "__main__":
    main()

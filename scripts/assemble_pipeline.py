"""Training exports → one pipeline folder for ``ImageTo3DPipeline.from_pretrained`` and ``d3s2 generate --weights``.

    python scripts/assemble_pipeline.py --sparse-vae runs/vae/export --dense-vae runs/dense_vae/export \
        --dense-dit runs/dit_dense/export --sparse-dit runs/dit_sparse/export --out weights/demo

Prints the folder's size and parameter count per component. See :mod:`d3s2.pipeline.assemble`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from d3s2.pipeline.assemble import assemble_pipeline


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparse-vae", required=True, help="SS-VAE export (d3s2 train vae)")
    p.add_argument("--dense-vae", required=True, help="dense VAE export (d3s2 train dense_vae)")
    p.add_argument("--dense-dit", required=True, help="dense DiT export (d3s2 train dit_dense)")
    p.add_argument("--sparse-dit", required=True, help="sparse DiT export (d3s2 train dit_sparse)")
    p.add_argument("--out", required=True, help="pipeline folder to write (replaced atomically)")
    p.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16", help="stored weight dtype (fp16)")
    p.add_argument("--dense-steps", type=int, default=None)
    p.add_argument("--sparse-steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=None, help="guidance scale of both stages")
    p.add_argument("--occupancy-threshold", type=float, default=None)
    p.add_argument("--summary", default=None, help="also write the component sizes as JSON here")
    args = p.parse_args(argv)
    pipe = assemble_pipeline(
        sparse_vae=args.sparse_vae, dense_vae=args.dense_vae, dense_dit=args.dense_dit, sparse_dit=args.sparse_dit,
        out=args.out, dtype=torch.float16 if args.dtype == "fp16" else torch.float32,
        dense_sampler={"steps": args.dense_steps, "guidance_scale": args.cfg},
        sparse_sampler={"steps": args.sparse_steps, "guidance_scale": args.cfg},
        occupancy_threshold=args.occupancy_threshold)
    sizes = {name: sum(p.numel() for p in m.parameters()) for name, m in pipe.components().items()}
    total_bytes = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    summary = {"params": sizes, "params_total": sum(sizes.values()), "folder_bytes": total_bytes,
               "settings": pipe.settings.to_dict()}
    for name, n in sizes.items():
        print(f"{name:28s} {n / 1e6:8.3f} M params")
    print(f"total {sum(sizes.values()) / 1e6:.3f} M params, {total_bytes / 2**20:.1f} MiB on disk -> {args.out}")
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

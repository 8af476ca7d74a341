"""``d3s2 convert DIR --out OUT``: turn a published Direct3D-S2 folder into d3s2's config.json + safetensors."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)

_DTYPES = ("keep", "float32", "float16", "bfloat16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert published Direct3D-S2 weights (config.yaml + model_*.ckpt) to d3s2's "
                                       "format",
                       description="Reads DIR/config.yaml and the model_*.ckpt files (torch.load weights_only=True "
                                   "only), maps every tensor strictly onto the d3s2 modules and writes "
                                   "OUT/<component>/{config.json,model.safetensors} plus OUT/pipeline.json.")
    p.add_argument("dir", help="published folder, e.g. .../Direct3D-S2/direct3d-s2-v-1-1")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--components", nargs="+", metavar="NAME",
                   help="subset to convert (default: every component whose checkpoint file is present)")
    p.add_argument("--dtype", choices=_DTYPES, default="keep",
                   help="weight dtype to write (default: keep the stored dtypes)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import torch

    from .published import convert_published

    dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
    out = convert_published(args.dir, args.out, args.components, dtype=dtype)
    logger.info("wrote %s", out)
    return 0

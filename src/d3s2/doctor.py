"""``d3s2 doctor``: versions, devices, the bundled weights, and which backend each op would pick for inputs on
each device."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform

# Modules whose import registers op backends (cheap: no triton import at module level).
OP_MODULES = [
    "d3s2.ops.conv",
    "d3s2.ops.block_attn",
    "d3s2.ops.ssa",
    "d3s2.ops.dit_norm",
    "d3s2.ops.linear_gelu",
    "d3s2.ops.mesh_field",
]

# Every runtime dependency of pyproject.toml (the base list and the extras but dev), and spconv.
PACKAGES = ["torch", "triton", "numpy", "scipy", "trimesh", "safetensors", "pyyaml", "tqdm", "pillow",
            "charset-normalizer", "libigl", "embreex", "scikit-image", "fast-simplification", "transformers",
            "tensorboard", "spconv", "gradio", "fastapi", "uvicorn", "python-multipart"]


def report() -> list[str]:
    import torch

    from d3s2 import __version__
    from d3s2.ops import BackendUnavailableError, registered_ops

    lines = [f"d3s2 {__version__}", f"python {platform.python_version()} ({platform.platform()})", "", "packages:"]
    for pkg in PACKAGES:
        try:
            lines.append(f"  {pkg:20s} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"  {pkg:20s} -")
    lines += ["", "devices:", f"  cpu            {torch.get_num_threads()} threads"]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i}         {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
            devices.append(torch.device("cuda", i))
    else:
        lines.append("  cuda           not available")
    lines += ["", "bundled weights:", *bundled_weights()]
    for mod in OP_MODULES:
        importlib.import_module(mod)
    lines += ["", "op backends (auto choice for fp16/fp32 inputs per device):"]
    for op, table in sorted(registered_ops().items()):
        for dev in devices:
            probe = torch.zeros(1, device=dev, dtype=torch.float16 if dev.type == "cuda" else torch.float32)
            try:
                choice = table.resolve(None, probe)
            except BackendUnavailableError as err:
                choice = f"none ({err})"
            lines.append(f"  {op:14s} {str(dev):8s} -> {choice}   [backends: {', '.join(table.names)}; "
                         f"env {table.env_var}]")
    return lines


def bundled_weights() -> list[str]:
    """One line per weights folder shipped in the package: where it is and its size, or that it is missing."""
    from d3s2.models.vae.cli import bundled_vae_dir
    from d3s2.pipeline import demo_weights_dir

    lines = []
    for label, root, marker in (("demo pipeline", demo_weights_dir(), "pipeline.json"),
                                ("demo SS-VAE", bundled_vae_dir(), "config.json")):
        if (root / marker).is_file():
            size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
            lines.append(f"  {label:14s} {root} ({size / 2**20:.1f} MiB)")
        else:
            lines.append(f"  {label:14s} missing (expected {root / marker}): pass --weights")
    return lines


def _run(args: argparse.Namespace) -> int:
    print("\n".join(report()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="print versions, devices and the backend each op would use")
    p.set_defaults(func=_run)

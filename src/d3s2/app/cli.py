"""``d3s2 app`` (Gradio web app) and ``d3s2 serve`` (FastAPI JSON service) over one pipeline folder."""

from __future__ import annotations

import argparse
import importlib.util
import os

MIB = 2**20
MAX_IMAGE_SIDE = 4096  # the default --max-pixels is a square image of this side


def tcp_port(text: str) -> int:
    """argparse type of ``--port``: checked while parsing, before any model is loaded or folder created."""
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}")
    return int(text)


def _common(p: argparse.ArgumentParser, port: int, out: str) -> None:
    from ..pipeline.cli import add_weights_arguments

    add_weights_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=tcp_port, default=port, help=f"port, 1-65535 (default {port})")
    p.add_argument("--out", default=out, help=f"the only folder written to: job results, upload copies "
                                              f"(default {out})")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload (default 10 MiB)")
    p.add_argument("--max-pixels", type=int, default=MAX_IMAGE_SIDE**2,
                   help=f"largest image, width × height (default {MAX_IMAGE_SIDE}² = {MAX_IMAGE_SIDE**2})")
    p.add_argument("--max-queue", type=int, default=4, help="jobs waiting behind the running one (default 4)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per job from submission (default 900)")
    p.add_argument("--results-cap-mb", type=float, default=2048.0,
                   help="results kept on disk; the oldest finished jobs' files go first (default 2048)")
    p.add_argument("--band", type=float, default=None,
                   help="SS-VAE band τ of the reconstruct jobs (default: the VAE's vae_task.json, else 1/128)")


def register(subparsers: argparse._SubParsersAction) -> None:
    a = subparsers.add_parser("app", help="Gradio web app: image → 3D, and the VAE round trip",
                              description="Serve the image-to-3D web app (needs the [app] extra).")
    _common(a, 7860, "out/app")
    a.set_defaults(func=_run_app)
    s = subparsers.add_parser("serve", help="JSON HTTP service: POST /v1/generate, GET /v1/jobs/{id}",
                              description="Serve the image-to-3D JSON API (needs the [app] extra); OpenAPI at "
                                          "/docs.")
    _common(s, 8000, "out/serve")
    s.set_defaults(func=_run_serve)


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)}: install the app extra, pip install 'd3s2[app]'")


def _engine(args: argparse.Namespace):
    from ..pipeline.cli import resolve_weights
    from .engine import Engine, Limits

    for name in ("max_upload_mb", "max_pixels", "max_queue", "timeout", "results_cap_mb"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * MIB), max_pixels=args.max_pixels,
                    max_queue=args.max_queue, timeout_s=args.timeout,
                    results_cap_bytes=int(args.results_cap_mb * MIB))
    return Engine.from_weights(resolve_weights(args.weights), args.out, device=args.device,
                               conditioner=args.conditioner, limits=limits, band=args.band)


def _run_serve(args: argparse.Namespace) -> int:
    _require("fastapi", "uvicorn", "python_multipart")
    import uvicorn

    from .service import create_service

    engine = _engine(args)
    print(f"d3s2 serve: http://{args.host}:{args.port} (OpenAPI: /docs), device {engine.device}, "
          f"out {engine.out_dir}", flush=True)
    try:
        uvicorn.run(create_service(engine), host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()  # also on a failed start (port taken); closing twice is harmless
    return 0


def _run_app(args: argparse.Namespace) -> int:
    _require("gradio", "fastapi", "uvicorn")
    engine = _engine(args)
    # Before gradio builds anything: its upload and result copies go inside our output folder.
    os.environ["GRADIO_TEMP_DIR"] = str(engine.out_dir / "gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    import uvicorn
    from fastapi import FastAPI

    from .web import build_app

    # Mounted on our own server rather than Blocks.launch(): launch() gives up when its 3 s self-check of the
    # page times out (a busy machine), and uvicorn shuts down cleanly on Ctrl-C / SIGTERM.
    server = gr.mount_gradio_app(FastAPI(), build_app(engine), path="/", server_name=args.host,
                                 server_port=args.port, footer_links=["api"], show_error=True, ssr_mode=False,
                                 max_file_size=engine.limits.max_upload_bytes, allowed_paths=[str(engine.jobs_dir)])
    print(f"d3s2 app: http://{args.host}:{args.port}, device {engine.device}, out {engine.out_dir}", flush=True)
    try:
        uvicorn.run(server, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()
    return 0

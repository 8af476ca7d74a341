"""``d3s2 app`` (Gradio web app) and ``d3s2 serve`` (FastAPI JSON service) over one pipeline folder."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import math
import os
import signal
import socket
from collections.abc import Iterator

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
    a.add_argument("--uploads-cap-mb", type=float, default=256.0,
                   help="Gradio's copies of uploads and preview images kept on disk (OUT/gradio); the least "
                        "recently used go first (default 256)")
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


def _check_limits(args: argparse.Namespace) -> None:
    """The size, time and band options: finite and positive, checked before the port is taken or a model loads."""
    for name in ("max_upload_mb", "max_pixels", "max_queue", "timeout", "results_cap_mb", "uploads_cap_mb", "band"):
        value = getattr(args, name, None)  # --uploads-cap-mb: the app only
        # nan passes a plain `<= 0` test; inf overflows the byte counts or never times out
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")


@contextlib.contextmanager
def listening_sockets(host: str, port: int) -> Iterator[list[socket.socket]]:
    """Sockets bound to ``host:port`` (every address it resolves to) and listening, for uvicorn to serve on;
    closed on exit.

    Taken before any model loads: a busy port is one clear error at once rather than after the load, and no other
    process can take the port meanwhile (binding is the only race-free check). OSError says what to do.
    """
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise OSError(f"cannot resolve --host {host!r}: {err.strerror}") from None
    sockets: list[socket.socket] = []
    with contextlib.ExitStack() as opened:  # closed on exit; uvicorn closes them too when it shuts down (harmless)
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):  # a host may list an address twice
                sock = opened.enter_context(socket.socket(family, kind, proto))
                sockets.append(sock)
                # A restart binds while the last run's connections linger in TIME_WAIT (uvicorn does the same).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # the IPv4 address gets its own
                sock.bind(address)
                sock.listen(2048)  # at once: with SO_REUSEADDR, a socket that is only bound does not hold the port
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise OSError(f"{where} is already in use (another server listens there): pick another --port, "
                              "or stop that server") from None
            raise OSError(f"cannot listen on {where}: {err.strerror}; check --host and --port") from None
        yield sockets


def _engine(args: argparse.Namespace, weights: str):
    from .engine import Engine, Limits

    limits = Limits(max_upload_bytes=int(args.max_upload_mb * MIB), max_pixels=args.max_pixels,
                    max_queue=args.max_queue, timeout_s=args.timeout,
                    results_cap_bytes=int(args.results_cap_mb * MIB))
    return Engine.from_weights(weights, args.out, device=args.device, conditioner=args.conditioner,
                               limits=limits, band=args.band)


def _serve_on(sockets: list[socket.socket], asgi_app, args: argparse.Namespace) -> None:
    """uvicorn on the sockets already listening. Ctrl-C and SIGTERM shut it down cleanly, then reach
    :func:`d3s2.cli.main` as they would for any command (exit 130 / 143): ``uvicorn.run`` would swallow Ctrl-C
    (exit 0). A signal the process was started with ignored (SIGINT, for a command started with ``&`` from a
    script) stays ignored, as in any program: the server goes on serving."""
    import uvicorn

    ignored = {sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is signal.SIG_IGN}

    class Server(uvicorn.Server):
        # uvicorn traps SIGINT/SIGTERM while it serves, and once shut down raises the signal again under the
        # handlers it found: KeyboardInterrupt, or d3s2.cli's Terminated; under an ignored one, nothing (exit 0).
        def handle_exit(self, sig: int, frame) -> None:
            if sig not in ignored:
                super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(asgi_app, host=args.host, port=args.port, log_level="warning"))
    server.run(sockets=sockets)


def _check_before_loading(args: argparse.Namespace) -> str:
    """The weights folder, after the checks that load no model (options, the folder's pipeline.json): errors
    before the port is taken."""
    from ..pipeline.cli import resolve_weights
    from ..pipeline.image_to_3d import read_resolutions

    _check_limits(args)
    weights = resolve_weights(args.weights)
    read_resolutions(weights)
    return weights


def _run_serve(args: argparse.Namespace) -> int:
    _require("fastapi", "uvicorn", "python_multipart")
    from .service import create_service

    weights = _check_before_loading(args)
    with listening_sockets(args.host, args.port) as sockets:
        engine = _engine(args, weights)
        print(f"d3s2 serve: http://{args.host}:{args.port} (OpenAPI: /docs), device {engine.device}, "
              f"out {engine.out_dir}", flush=True)
        try:
            _serve_on(sockets, create_service(engine), args)
        finally:
            engine.close()  # also on a failed start; closing twice is harmless
    return 0


def _run_app(args: argparse.Namespace) -> int:
    _require("gradio", "fastapi", "uvicorn")
    weights = _check_before_loading(args)
    with listening_sockets(args.host, args.port) as sockets:
        engine = _engine(args, weights)
        try:
            gradio_folder = engine.out_dir / "gradio"
            # Before gradio is imported (some of it reads the variable then): its files go inside our output folder.
            os.environ["GRADIO_TEMP_DIR"] = str(gradio_folder)
            os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
            from .web import GradioFiles, serve_app

            files = GradioFiles(gradio_folder, int(args.uploads_cap_mb * MIB))
            # Mounted on our own server rather than Blocks.launch(): launch() gives up when its 3 s self-check of
            # the page times out (a busy machine), and binds a port itself (ours is held since before the load).
            server = serve_app(engine, files, host=args.host, port=args.port)
            print(f"d3s2 app: http://{args.host}:{args.port}, device {engine.device}, out {engine.out_dir}",
                  flush=True)
            _serve_on(sockets, server, args)
        finally:
            engine.close()
    return 0

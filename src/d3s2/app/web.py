"""``d3s2 app``: the Gradio web app over an :class:`~d3s2.app.engine.Engine`.

Two tabs:

* **Generate**: upload an image (or pick an example), see the conditioner's view of it (the composited crop and
  the foreground mask it will use), choose resolution, seed, steps, CFG and a target face count, follow the
  progress per stage, turn the result in a 3D viewer and download it as GLB, OBJ or PLY.
* **Reconstruct**: upload a mesh → SS-VAE encode/decode round trip, shown beside the input.

Uploads go through the engine's checks (size, pixels, format: a bad file is an error message in the page) and
every job through the engine's queue, so the app and the API behave the same. Results are served from their job
folders, never copied into Gradio's cache: the engine's results cap bounds them all, and a link to a result the
cap removed answers 410 with the reason, as the API does. Gradio's own files (copies of uploads, preview images)
stay in one folder kept under a byte cap by :class:`GradioFiles`; :func:`serve_app` puts it all on one ASGI app.
Point ``GRADIO_TEMP_DIR`` at that folder before Gradio is imported (``d3s2 app`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from stat import S_ISREG
from typing import Any

import anyio
import gradio as gr
import numpy as np
from fastapi import FastAPI
from gradio.route_utils import API_PREFIX
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .engine import (
    INPUT_NAME,
    MAX_SEED,
    UPLOAD_MESH_SUFFIXES,
    ArrivingUploads,
    Engine,
    GenerateParams,
    RequestError,
    read_image,
    read_mesh,
)
from .service import FORM_OVERHEAD

POLL_S = 0.2
NO_IMAGE = "upload an image first (or pick an example)"
HASH_FOLDER = re.compile(r"^[0-9a-f]{64}$")  # Gradio keeps each file in a folder named by its content's sha256
TEMP_FILE = re.compile(r"^tmp[a-z0-9_]{8}$")  # tempfile's names: uploads still arriving, gr.File's empty files
# A temporary file not written to for this long is no upload in progress (its client went away), or one of the
# empty files gr.File(type="filepath") opens in Gradio's folder at every event and never removes (gradio 6).
STALE_TEMP_S = 60.0
MAX_AGE_S = 3600.0  # a copy unused for this long goes even under the cap (Gradio's delete_cache sweep took an hour)
SWEEP_EVERY_S = 600.0  # how often the app trims its folder between requests (so old copies go on an idle server)


class GradioFiles:
    """What Gradio writes into its folder (``GRADIO_TEMP_DIR``; ``<out>/gradio`` under ``d3s2 app``), under a cap.

    Gradio keeps a copy of every upload and every preview image there, deleting them only on a schedule of its own
    (``delete_cache``, not used here), and never deletes the partial file of an upload whose client went away nor
    the empty temporary file gr.File leaves at every event. :meth:`trim` runs after every upload and at every event:
    above ``cap_bytes`` the least recently used copies go first (an event that reads an upload touches it; the
    newest always stays); temporary files go once stale. A cap, not a deletion once a job has read its upload:
    Gradio names a copy by its content, so users who upload the same image share one file, and a page sends the same
    path again at every event (the preview, then each Generate), so no single reader can tell it is the last. The
    files there when the app was built (the example images) always stay: the page refers to them. A copy not used
    for ``max_age_s`` goes whatever the cap (the app also runs :meth:`trim` on a schedule, see :func:`serve_app`). A
    removed file's path leaves the app's path sets too (Gradio's record of the files it may serve), which no Gradio
    sweep iterates meanwhile: it would stop with "set changed size during iteration".
    """

    def __init__(self, folder: str | Path, cap_bytes: int, *, max_age_s: float = MAX_AGE_S) -> None:
        self.folder = Path(folder).resolve()
        self._named = Path(os.path.abspath(folder))  # the folder as Gradio names its files: links not resolved
        self.cap_bytes = cap_bytes
        self.max_age_s = max_age_s
        self._kept: set[Path] = set()
        self._app: gr.Blocks | None = None
        self._lock = threading.Lock()

    def remove_all(self) -> None:
        """Remove Gradio's files: at start those of an earlier run, at shutdown this run's (no page refers to them
        then); other files in the folder stay."""
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            for entry in self.folder.iterdir():
                if entry.is_dir() and HASH_FOLDER.match(entry.name):
                    shutil.rmtree(entry, ignore_errors=True)
                elif entry.is_file() and TEMP_FILE.match(entry.name):
                    entry.unlink(missing_ok=True)

    def keep_current(self, app: gr.Blocks) -> None:
        """The files there now always stay (call once ``app`` is built: Gradio has cached the examples)."""
        self._kept = {path for path, _ in self._copies()}
        self._app = app

    def trim(self, room: int = 0) -> None:
        """Remove the stale temporary files, then the least recently used copies while above the cap less ``room``
        bytes (kept for uploads on their way) or unused for longer than ``max_age_s``."""
        with self._lock:
            now = time.time()
            copies = sorted(self._copies(), key=lambda item: item[1].st_mtime)
            temporary = list(self._temporary())
            total = sum(stat.st_size for _, stat in copies + temporary)
            for path, stat in temporary:
                if now - stat.st_mtime > STALE_TEMP_S:
                    path.unlink(missing_ok=True)
                    total -= stat.st_size
            newest = copies[-1][0] if copies else None
            for path, stat in copies:  # oldest first
                over_cap = total + room > self.cap_bytes and path != newest  # the newest (just uploaded) stays
                if not over_cap and now - stat.st_mtime <= self.max_age_s:
                    break
                if path in self._kept:
                    continue
                path.unlink(missing_ok=True)
                self._forget(path)
                total -= stat.st_size
                try:
                    path.parent.rmdir()  # its hash folder, once empty (an inode each, for every upload)
                except OSError:
                    pass  # not empty: Gradio keeps several names of one content there

    def _forget(self, path: Path) -> None:
        """Take ``path`` out of the app's path sets: each would otherwise keep it (≈ 200 bytes) for the process's
        life. In place, as Gradio's upload route updates them (the sets are shared with its components)."""
        if self._app is not None:
            names = {str(path), str(self._named / path.relative_to(self.folder))}
            for paths in list(self._app.temp_file_sets):
                paths.difference_update(names)

    def _copies(self) -> list[tuple[Path, os.stat_result]]:
        """Gradio's complete files, ``<sha256>/<name>`` (a name starting with a dot is a copy being written)."""
        found = []
        for folder in self.folder.iterdir():
            if HASH_FOLDER.match(folder.name):
                found += _stats(p for p in _listing(folder) if not p.name.startswith("."))
        return found

    def _temporary(self) -> list[tuple[Path, os.stat_result]]:
        return _stats(p for p in _listing(self.folder) if TEMP_FILE.match(p.name))


def _listing(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):  # removed or replaced meanwhile by another request
        return []


def _stats(paths) -> list[tuple[Path, os.stat_result]]:
    """(path, stat) of the regular files among ``paths``."""
    found = []
    for path in paths:
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed meanwhile (Gradio renames uploads into place)
            continue
        if S_ISREG(stat.st_mode):
            found.append((path, stat))
    return found


class UploadLimit:
    """ASGI middleware before Gradio's upload route. A body must declare its length, at most one upload and the
    form's overhead (411 / 413 before Gradio writes anything; Gradio alone takes up to 1000 files of the size
    limit in one request). Before an upload, Gradio's folder is trimmed to leave room for the bodies on their way
    (their declared lengths), and after it under its cap; an upload that would take those beyond the cap while
    another one arrives is refused (503, retry in a few seconds), so that concurrent uploads cannot fill the disk."""

    def __init__(self, app: ASGIApp, *, max_upload_bytes: int, files: GradioFiles) -> None:
        self.app = app
        self.max_body = max_upload_bytes + FORM_OVERHEAD
        self.max_upload_bytes = max_upload_bytes
        self.files = files
        self.arriving = ArrivingUploads(files.cap_bytes, "the uploads cap")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != f"{API_PREFIX}/upload":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if not declared.isdigit():
            await PlainTextResponse("an upload must declare its Content-Length", status_code=411)(scope, receive,
                                                                                                  send)
            return
        size = int(declared)
        if size > self.max_body:
            await PlainTextResponse(f"upload too large: {size} bytes, the limit is "
                                    f"{self.max_upload_bytes}", status_code=413)(scope, receive, send)
            return
        try:
            admitted = self.arriving.admit(size)
        except RequestError as err:
            await PlainTextResponse(err.message, status_code=err.status,
                                    headers={"Retry-After": "5"})(scope, receive, send)
            return
        try:
            with admitted:
                await anyio.to_thread.run_sync(self.files.trim, self.arriving.bytes)  # room for the bodies arriving
                await self.app(scope, receive, send)
        except ClientDisconnect:
            pass  # the client went away mid-body: no server fault to log (its partial file goes once stale)
        finally:
            await anyio.to_thread.run_sync(self.files.trim, self.arriving.bytes)


class RemovedResults:
    """ASGI middleware before Gradio's file route: a link to a result file of a job whose results the cap removed
    answers 410 with the reason, and one of a job the engine does not know (forgotten after a restart or beyond
    the jobs it keeps) 404, as ``d3s2 serve`` does (Gradio answers a generic 403 for a missing file). Only links of
    the form ``<jobs>/<id>/<file>``: any other request, any other path included, goes on to Gradio and its checks."""

    def __init__(self, app: ASGIApp, *, engine: Engine) -> None:
        self.app = app
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        await refusal(scope, receive, send)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        prefix = f"{API_PREFIX}/file="
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD") or not scope["path"].startswith(prefix):
            return None
        path = Path(os.path.normpath(scope["path"][len(prefix):]))
        if path.parent.parent != self.engine.jobs_dir:
            return None
        try:
            job = self.engine.get(path.parent.name)  # looked up in memory, never joined into a path
        except RequestError as err:
            return JSONResponse({"detail": f"{err.message} (a restart, or more jobs than the server keeps, "
                                           "forgets a job with its results)"}, status_code=err.status)
        if not job.expired:
            return None
        return JSONResponse({"detail": f"{job.removed_message}; run it again"}, status_code=410)


def example_images() -> list[str]:
    """Paths of the bundled example PNGs (renders of the example meshes)."""
    root = resources.files("d3s2") / "assets" / "examples"
    return sorted(str(p) for p in root.iterdir() if p.name.endswith(".png"))


def _error(message: str) -> gr.Error:
    # Shown until closed: a message that fades after a few seconds is easy to miss. A user's bad upload or a
    # failed job is no server fault: no traceback in the server's console.
    return gr.Error(message, duration=None, print_exception=False)


def _read_upload(path: str | None, missing: str) -> bytes:
    """The bytes of an upload's copy in Gradio's folder, which it touches: the last to go above the cap."""
    if not path:
        raise _error(missing)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise _error("the upload was removed (the server's space for uploads is full): upload it again") from None
    with contextlib.suppress(OSError):  # removed since, or a file not in Gradio's folder (read-only)
        os.utime(path)
    return data


def preview(engine: Engine, path: str | None) -> np.ndarray | None:
    """uint8 ``[S, 2S, 3]``: the conditioner's input (crop on white) beside the foreground mask it uses."""
    from ..models.conditioner import preprocess_image

    if not path:
        return None
    data = _read_upload(path, NO_IMAGE)
    try:
        image = read_image(data, engine.limits)
        # The first stage's encoder (the shared conditioner, or the dense DiT's own one).
        encoder = engine.pipeline.encoder_for("dense_dit")
        prepared = preprocess_image(image, size=max(encoder.image_size, 256))
    except (RequestError, ValueError) as err:
        raise _error(str(err)) from err
    rgb = prepared.rgb.permute(1, 2, 0).numpy()
    mask = np.repeat(prepared.mask.numpy()[..., None], 3, axis=2)
    return np.round(np.concatenate([rgb, mask], axis=1) * 255).astype(np.uint8)


def _wait(job: Any, progress: gr.Progress) -> None:
    while not job.finished.wait(POLL_S):
        if job.status == "queued":
            progress(0.0, desc="waiting in the queue")
        elif job.stage_total:
            progress((job.stage_index, job.stage_total), desc=job.stage, unit="stages")
    if job.status != "done":
        raise _error(f"{job.kind} {job.status}: {job.error}")


def _downloads(engine: Engine, job: Any) -> list[str]:
    """The result in every download format, written beside ``mesh.glb`` in the job's folder (under the cap)."""
    try:
        return [str(p) for p in engine.write_downloads(job)]
    except FileNotFoundError:  # a later job's results cap removed it since this one finished
        raise _error(f"{job.removed_message}; run it again") from None


def _summary(job: Any) -> str:
    r = job.result
    lines = [f"**{r['faces']} faces**, {r['vertices']} vertices, watertight: {r['watertight']}, "
             f"{r['resolution']}³, {r['wall_seconds']:.1f} s on {job.kind} job `{job.id}`"]
    if "seconds" in r:
        lines.append(", ".join(f"{k} {v:.2f} s" for k, v in r["seconds"].items() if k != "total"))
    return "\n\n".join(lines)


def build_app(engine: Engine, gradio_files: GradioFiles) -> gr.Blocks:
    """The Gradio Blocks of ``d3s2 app`` (not launched); ``gradio_files`` is Gradio's folder (``GRADIO_TEMP_DIR``): its
    files of an earlier run are removed first, those made while building (the examples) always stay."""
    gradio_files.remove_all()
    # Gradio copies every file an event returns into its cache, unless the file lies under a static path; such
    # copies would outlive the results cap (up to GradioFiles.max_age_s). Process-wide in Gradio, and the
    # job files never change once written (atomically, before an event returns their paths).
    gr.set_static_paths([engine.jobs_dir])
    resolutions = engine.pipeline.resolutions
    on_cpu = engine.device == "cpu"

    # Gradio finds its progress tracker through a gr.Progress() default argument.
    def generate(path: str | None, resolution: int, seed: float, steps: float, cfg: float, faces: float,
                 progress: gr.Progress = gr.Progress()) -> tuple[str, list[str], str]:  # noqa: B008
        gradio_files.trim()
        try:
            image = read_image(_read_upload(path, NO_IMAGE), engine.limits)
            params = GenerateParams(resolution=int(resolution), seed=int(seed or 0),
                                    steps=int(steps) if steps else None, cfg=float(cfg) if cfg else None,
                                    faces=int(faces) if faces else None)
            job = engine.submit_generate(image, params)
        except RequestError as err:
            raise _error(err.message) from err
        _wait(job, progress)
        files = _downloads(engine, job)
        return files[0], files, _summary(job)

    def show_preview(path: str | None) -> np.ndarray | None:
        gradio_files.trim()  # its image is one more file in Gradio's folder
        return preview(engine, path)

    def reconstruct(path: str | None, resolution: int,
                    progress: gr.Progress = gr.Progress()) -> tuple[str, str, list[str], str]:  # noqa: B008
        gradio_files.trim()
        data = _read_upload(path, "upload a mesh first")
        try:
            mesh = read_mesh(data, Path(path).suffix, engine.limits)
            job = engine.submit_reconstruct(mesh, int(resolution))
        except RequestError as err:
            raise _error(err.message) from err
        _wait(job, progress)
        files = _downloads(engine, job)
        return str(job.folder / f"{INPUT_NAME}.glb"), files[0], files, _summary(job)

    with gr.Blocks(title="d3s2: image → 3D") as app:
        gr.Markdown("# d3s2: image → watertight 3D mesh\nDirect3D-S2 from scratch. "
                    f"Device: `{engine.device}`; mesh resolutions {resolutions}. One job runs at a time.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    image = gr.File(label="Image (RGBA with the object's alpha works best)", file_types=["image"],
                                    type="filepath", elem_id="image-upload")
                    gr.Examples(example_images(), inputs=[image], label="Examples")
                    mask = gr.Image(label="Conditioner input and foreground mask", interactive=False,
                                    elem_id="mask-preview")
                    with gr.Row():
                        # On the CPU the lowest resolution is the only practical default.
                        res = gr.Dropdown(resolutions, value=resolutions[0] if on_cpu else resolutions[-1],
                                          label="Resolution")
                        seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED)
                    with gr.Row():
                        steps = gr.Slider(0, engine.limits.max_steps, value=0, step=1,
                                          label="Steps (0 = per-stage default)")
                        cfg = gr.Slider(0, 15, value=0, step=0.5, label="CFG (0 = per-stage default)")
                    faces = gr.Number(0, label="Target faces (0 = no decimation)", precision=0, minimum=0)
                    run = gr.Button("Generate", variant="primary", elem_id="generate-button")
                with gr.Column():
                    viewer = gr.Model3D(label="Result", elem_id="result-viewer", height=420)
                    downloads = gr.File(label="Download (GLB, OBJ, PLY)", file_count="multiple",
                                        elem_id="result-files")
                    info = gr.Markdown(elem_id="result-info")
            image.change(show_preview, inputs=[image], outputs=[mask], concurrency_limit=None)
            run.click(generate, inputs=[image, res, seed, steps, cfg, faces], outputs=[viewer, downloads, info],
                      concurrency_id="engine")
        with gr.Tab("Reconstruct (SS-VAE)"):
            gr.Markdown("Encode and decode a mesh with the sparse SDF VAE to inspect it (left: input, right: "
                        "round trip).")
            with gr.Row():
                mesh_in = gr.File(label="Mesh", file_types=list(UPLOAD_MESH_SUFFIXES), type="filepath",
                                  elem_id="mesh-upload")
                vae_res = gr.Dropdown(resolutions, value=resolutions[0], label="VAE resolution")
                rec = gr.Button("Reconstruct", variant="primary", elem_id="reconstruct-button")
            with gr.Row():
                shown_in = gr.Model3D(label="Input", height=360)
                shown_out = gr.Model3D(label="VAE round trip", height=360)
            rec_files = gr.File(label="Download", file_count="multiple")
            rec_info = gr.Markdown()
            rec.click(reconstruct, inputs=[mesh_in, vae_res], outputs=[shown_in, shown_out, rec_files, rec_info],
                      concurrency_id="engine")
    # The engine runs one job at a time; these limits only bound the waiting page events.
    app.queue(max_size=engine.limits.max_queue + 1, default_concurrency_limit=engine.limits.max_queue + 1)
    gradio_files.keep_current(app)
    return app


def serve_app(engine: Engine, gradio_files: GradioFiles, *, host: str, port: int,
              sweep_every_s: float = SWEEP_EVERY_S) -> FastAPI:
    """The ASGI app of ``d3s2 app``: :func:`build_app` mounted on a FastAPI app, behind :class:`UploadLimit` and
    :class:`RemovedResults`. ``host`` and ``port`` are where uvicorn serves it (Gradio writes them in its page).
    While it serves, Gradio's folder is trimmed every ``sweep_every_s`` (copies past their age go on an idle
    server too), and emptied of Gradio's files at shutdown."""

    @contextlib.asynccontextmanager
    async def sweeping(_: FastAPI) -> AsyncIterator[None]:
        async def sweep() -> None:
            while True:
                await asyncio.sleep(sweep_every_s)
                await anyio.to_thread.run_sync(gradio_files.trim)

        task = asyncio.create_task(sweep())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await anyio.to_thread.run_sync(gradio_files.remove_all)

    server = FastAPI(lifespan=sweeping)
    server.add_middleware(UploadLimit, max_upload_bytes=engine.limits.max_upload_bytes, files=gradio_files)
    server.add_middleware(RemovedResults, engine=engine)
    return gr.mount_gradio_app(server, build_app(engine, gradio_files), path="/", server_name=host, server_port=port,
                               footer_links=["api"], show_error=True, ssr_mode=False,
                               max_file_size=engine.limits.max_upload_bytes, allowed_paths=[str(engine.jobs_dir)])

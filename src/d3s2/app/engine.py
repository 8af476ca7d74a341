"""The job engine behind ``d3s2 app`` and ``d3s2 serve``: checked inputs, one worker, a bounded queue.

* **Inputs.** :func:`read_image` and :func:`read_mesh` turn uploaded bytes into arrays or raise
  :class:`RequestError` with the HTTP status a client should see (400 empty, 413 too large, 415 not an image
  or mesh, 422 an image no generation can use). Pixels are counted from the header before any decoding.
* **Jobs.** :meth:`Engine.submit_generate` / :meth:`Engine.submit_reconstruct` queue a :class:`Job` with a
  server-made id (``uuid4().hex``); one worker thread runs them in order on the device. A full queue is a 429,
  a closed engine a 503. Every job has a deadline (``Limits.timeout_s`` from submission): a queued job past it
  never starts, a running one stops at its next stage or model call (forward pre-hooks on the components).
* **Files.** Each job writes only into ``<out>/jobs/<id>/``; after every job, and after
  :meth:`Engine.write_downloads` adds files to one, the oldest finished results are deleted until the folder is
  under ``Limits.results_cap_bytes``. Job ids from requests are only ever looked up in memory, never joined into
  a path. Job records live in memory (without their inputs once finished): a new engine removes the job folders
  of an earlier one.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import math
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_write_bytes

logger = logging.getLogger(__name__)

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
MESH_FORMATS = ("glb", "obj", "ply")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
UPLOAD_MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")
RESULT_NAME = "mesh"
INPUT_NAME = "input"
MAX_SEED = 2**31 - 1
MAX_CFG = 50.0


class RequestError(ValueError):
    """A request the engine refuses; ``status`` is the HTTP status code for it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ArrivingUploads:
    """The bytes of the upload bodies being received at once, under a budget: an upload that would take them
    beyond it while another one arrives is refused (503), one alone always passes. Used on the event loop only."""

    def __init__(self, budget: int, budget_name: str) -> None:
        self.budget = budget
        self.budget_name = budget_name  # named in the refusal: "the uploads cap"
        self.bytes = 0

    def admit(self, size: int) -> contextlib.ExitStack:
        """Count ``size`` bytes (a body's declared length, or its limit) until the returned context is left; raises
        :class:`RequestError` (503) at once, before the block, if they do not fit."""
        if self.bytes and self.bytes + size > self.budget:
            raise RequestError(503, f"busy: {self.bytes} bytes of other uploads are arriving, and with these {size} "
                                    f"they would exceed {self.budget_name} ({self.budget} bytes); retry in a few "
                                    "seconds")
        self.bytes += size
        admitted = contextlib.ExitStack()
        admitted.callback(self._release, size)
        return admitted

    def _release(self, size: int) -> None:
        self.bytes -= size


class JobStopped(RuntimeError):
    """Raised inside a running job when it is cancelled or past its deadline."""


@dataclass(kw_only=True)
class Limits:
    """What one request may ask for, and how much the engine keeps."""

    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 4096 * 4096  # width × height of an uploaded image
    max_mesh_faces: int = 1_000_000  # faces of an uploaded mesh (reconstruct)
    max_queue: int = 4  # jobs waiting behind the running one; more is a 429
    timeout_s: float = 900.0  # per job, counted from submission
    results_cap_bytes: int = 2 * 2**30  # job folders on disk; the oldest finished ones go first
    max_steps: int = 100
    max_jobs_kept: int = 1000  # job records in memory


@dataclass(kw_only=True)
class GenerateParams:
    """Settings of one generate job (None: the pipeline's own per-stage setting)."""

    resolution: int | None = None
    seed: int = 0
    steps: int | None = None
    cfg: float | None = None
    faces: int | None = None


# ------------------------------------------------------------------------------------------------ inputs
def read_image(data: bytes, limits: Limits) -> np.ndarray:
    """Uploaded bytes → uint8 ``[H, W, 4]`` (alpha kept) or ``[H, W, 3]``; RequestError when unusable, including
    an image no generation can use (smaller than ``MIN_IMAGE_SIDE`` a side, an empty alpha channel: 422)."""
    from PIL import Image, UnidentifiedImageError

    from ..models.conditioner import MIN_IMAGE_SIDE, check_object_alpha, exif_warnings_collected, upright_rgb_or_rgba

    if not data:
        raise RequestError(400, "empty upload: expected an image file (PNG, JPEG, WebP, BMP or TIFF)")
    _check_size(len(data), limits)
    try:
        with exif_warnings_collected() as opening:  # a JPEG reads its EXIF block as it opens: one warning with the rest
            img = Image.open(io.BytesIO(data))
        with img:
            if img.format not in IMAGE_FORMATS:
                raise RequestError(415, f"unsupported image format {img.format}: expected one of "
                                        f"{', '.join(IMAGE_FORMATS)}")
            w, h = img.size
            if w * h > limits.max_pixels:
                raise RequestError(413, f"image too large: {w}x{h} = {w * h} pixels, the limit is "
                                        f"{limits.max_pixels}")
            if w < MIN_IMAGE_SIDE or h < MIN_IMAGE_SIDE:
                raise RequestError(422, f"image too small: expected at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} "
                                        f"pixels, got {w}x{h}")
            decoded = upright_rgb_or_rgba(img, exif_problems=opening)
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL refuses (or, under -W error, warns about) a header far above any limit before our own check.
        raise RequestError(413, f"image too large ({err}); the limit is {limits.max_pixels} pixels") from err
    except UnidentifiedImageError as err:
        raise RequestError(415, "not an image: expected PNG, JPEG, WebP, BMP or TIFF data") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise RequestError(415, f"cannot decode the image: {err}") from err
    try:
        check_object_alpha(decoded)
    except ValueError as err:
        raise RequestError(422, str(err)) from err
    return np.ascontiguousarray(np.asarray(decoded))


def read_mesh(data: bytes, suffix: str, limits: Limits):
    """Uploaded bytes with the file's suffix (``.glb``, ``.obj``, ...) → ``trimesh.Trimesh``; RequestError."""
    import trimesh

    from ..geometry.mesh_io import validate_mesh

    if not data:
        raise RequestError(400, "empty upload: expected a mesh file (" + ", ".join(UPLOAD_MESH_SUFFIXES) + ")")
    _check_size(len(data), limits)
    suffix = suffix.lower()
    if suffix not in UPLOAD_MESH_SUFFIXES:
        raise RequestError(415, f"unsupported mesh file type {suffix or '(none)'}: expected one of "
                                f"{', '.join(UPLOAD_MESH_SUFFIXES)}")
    try:
        # resolver=None: a glTF/OBJ that names other files must not read anything from disk.
        loaded = trimesh.load(io.BytesIO(data), file_type=suffix[1:], force="mesh", resolver=None, process=False)
        mesh = validate_mesh(np.asarray(loaded.vertices), np.asarray(loaded.faces), "uploaded mesh")
    except Exception as err:  # trimesh raises many types on malformed files
        raise RequestError(415, f"cannot read the mesh: {err}") from err
    if len(mesh.faces) > limits.max_mesh_faces:
        raise RequestError(413, f"mesh too large: {len(mesh.faces)} faces, the limit is {limits.max_mesh_faces}")
    return mesh


def _check_size(n: int, limits: Limits) -> None:
    if n > limits.max_upload_bytes:
        raise RequestError(413, f"upload too large: {n} bytes, the limit is {limits.max_upload_bytes}")


# ------------------------------------------------------------------------------------------------ jobs
@dataclass(eq=False)
class Job:
    """One queued piece of work and its state (read by the API and the app while the worker runs it)."""

    id: str
    kind: str  # "generate" or "reconstruct"
    folder: Path
    deadline: float  # time.monotonic() seconds
    work: Callable[[Job], dict[str, Any]] | None  # None once finished: it holds the upload (up to 64 MiB decoded)
    created: float = field(default_factory=time.time)
    status: str = "queued"  # queued → running → done | failed | timeout | cancelled
    stage: str = ""
    stage_index: int = 0
    stage_total: int = 0
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    expired: bool = False  # its files were removed by the size cap
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    def set_stage(self, name: str, index: int, total: int) -> None:
        self.check()
        self.stage, self.stage_index, self.stage_total = name, index, total

    def check(self) -> None:
        """Raise :class:`JobStopped` when the job was cancelled or is past its deadline."""
        if self.cancel.is_set():
            raise JobStopped("cancelled")
        if time.monotonic() > self.deadline:
            raise JobStopped("timeout")

    @property
    def progress(self) -> float:
        if self.status == "done":
            return 1.0
        return self.stage_index / self.stage_total if self.stage_total else 0.0

    def file(self, name: str) -> Path | None:
        """A result file of a finished job, or None (not done, removed by the size cap, or not written)."""
        if self.status != "done" or self.expired:
            return None
        path = self.folder / name
        return path if path.is_file() else None

    @property
    def removed_message(self) -> str:
        """What a request for this job's result is told once the results cap has removed it (API and app alike)."""
        return f"job {self.id}: the result was removed (results size cap)"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "status": self.status, "stage": self.stage,
                "stage_index": self.stage_index, "stage_total": self.stage_total,
                "progress": round(self.progress, 4), "error": self.error, "result": self.result,
                "expired": self.expired, "created": self.created}


class Engine:
    """Loaded models + one worker thread + a bounded FIFO queue + a capped results folder.

    Args:
        pipeline: an :class:`~d3s2.pipeline.image_to_3d.ImageTo3DPipeline`.
        out_dir: the only folder the engine writes to (job results under ``jobs/``).
        device: where jobs run (``cuda``, ``cpu``).
        band: SS-VAE band τ for the reconstruct jobs (the VAEs' training band).
    """

    def __init__(self, pipeline: Any, out_dir: str | Path, *, device: str = "cpu", limits: Limits | None = None,
                 band: float | None = None) -> None:
        from ..models.vae.cli import DEFAULT_BAND

        self.pipeline = pipeline
        self.device = device
        self.limits = limits or Limits()
        self.band = band or DEFAULT_BAND
        self.out_dir = Path(out_dir).resolve()
        self.jobs_dir = self.out_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.jobs_dir.iterdir():  # results of an earlier run: no job record points at them
            if stale.is_dir() and JOB_ID.match(stale.name):
                shutil.rmtree(stale, ignore_errors=True)
        self._cond = threading.Condition()
        self._cap_lock = threading.Lock()  # no job folder is removed while files are written into it
        self._waiting: collections.deque[Job] = collections.deque()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._running: Job | None = None
        self._closed = False
        self._hooks = [m.register_forward_pre_hook(self._check_running) for m in pipeline.components().values()]
        self._thread = threading.Thread(target=self._loop, name="d3s2-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_weights(cls, weights: str | Path, out_dir: str | Path, *, device: str | None = None,
                     conditioner: str | None = None, limits: Limits | None = None,
                     band: float | None = None) -> Engine:
        """Load a pipeline folder once (``ImageTo3DPipeline.from_pretrained``)."""
        import torch

        from ..pipeline.image_to_3d import ImageTo3DPipeline

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device} asked for but torch sees no CUDA device; use --device cpu")
        pipe = ImageTo3DPipeline.from_pretrained(weights, conditioner=conditioner)
        return cls(pipe, out_dir, device=device, limits=limits, band=band or _weights_band(Path(weights), pipe))

    # -------------------------------------------------------------------------------------------- submit
    def check_generate(self, params: GenerateParams) -> None:
        """RequestError 422 for settings no generate job can use (:meth:`submit_generate` checks them too; the
        service asks first, before it decodes the upload)."""
        resolutions = self.pipeline.resolutions
        if params.resolution is not None and params.resolution not in resolutions:
            raise RequestError(422, f"expected resolution in {resolutions}, got {params.resolution}")
        if not 0 <= params.seed <= MAX_SEED:
            raise RequestError(422, f"expected seed in [0, {MAX_SEED}], got {params.seed}")
        if params.steps is not None and not 1 <= params.steps <= self.limits.max_steps:
            raise RequestError(422, f"expected steps in [1, {self.limits.max_steps}], got {params.steps}")
        if params.faces is not None and params.faces <= 0:
            raise RequestError(422, f"expected a positive face count, got {params.faces}")
        # isfinite first: nan compares false with every bound, so a range test alone would blame the range
        if params.cfg is not None and not (math.isfinite(params.cfg) and 0.0 <= params.cfg <= MAX_CFG):
            raise RequestError(422, f"expected cfg to be a finite number in [0, {MAX_CFG:g}], got {params.cfg}")

    def submit_generate(self, image: np.ndarray, params: GenerateParams) -> Job:
        """Queue image → mesh; writes ``mesh.glb``. Parameters are checked here (RequestError 422)."""
        from ..pipeline.image_to_3d import require_surface

        self.check_generate(params)

        def work(job: Job) -> dict[str, Any]:
            mesh = require_surface(self.pipeline(image, resolution=params.resolution, seed=params.seed,
                                                 steps=params.steps, cfg=params.cfg, faces=params.faces,
                                                 device=self.device, progress=False, on_stage=job.set_stage))
            self._export(job, mesh, RESULT_NAME)
            seconds = {k: round(v, 3) for k, v in self.pipeline.last_timing.seconds.items()}
            return {**_summary(mesh), "seconds": seconds,
                    "resolution": params.resolution or self.pipeline.resolutions[-1]}

        return self._submit("generate", work)

    def submit_reconstruct(self, mesh: Any, resolution: int | None = None) -> Job:
        """Queue mesh → SS-VAE round trip at ``resolution`` (default the lowest); writes ``input.glb`` (the
        upload as GLB, for side-by-side display) and ``mesh.glb``."""
        import torch

        from ..models.vae.cli import reconstruct_mesh

        resolutions = self.pipeline.resolutions
        r = resolutions[0] if resolution is None else int(resolution)
        if r not in resolutions:
            raise RequestError(422, f"expected resolution in {resolutions}, got {resolution}")

        def work(job: Job) -> dict[str, Any]:
            self._export(job, mesh, INPUT_NAME)
            job.set_stage(f"vae {r}", 0, 1)
            vae = self.pipeline.sparse_vaes[r]
            vae.to(device=self.device, dtype=torch.float32)  # the generate jobs may have left it in bf16
            try:
                out = reconstruct_mesh(vae, mesh, r, self.band, chunk_size=self.pipeline.settings.chunk(r),
                                       device=self.device)
            except ValueError as err:  # an empty band or reconstruction: the job failed, not the server
                raise RuntimeError(str(err)) from err
            self._export(job, out, RESULT_NAME)
            return {**_summary(out), "resolution": r, "input_faces": int(len(mesh.faces))}

        return self._submit("reconstruct", work)

    def _submit(self, kind: str, work: Callable[[Job], dict[str, Any]]) -> Job:
        job_id = uuid.uuid4().hex
        job = Job(id=job_id, kind=kind, folder=self.jobs_dir / job_id,
                  deadline=time.monotonic() + self.limits.timeout_s, work=work)
        with self._cond:
            self._check_accepting()
            self._waiting.append(job)
            self._jobs[job_id] = job
            self._forget_old()
            self._cond.notify_all()
        return job

    def check_accepting(self) -> None:
        """RequestError 503 while shutting down, 429 while the queue is full. The service asks before it reads and
        decodes an upload (so a flood of uploads is turned away without decoding any); queueing asks again."""
        with self._cond:
            self._check_accepting()

    def _check_accepting(self) -> None:
        if self._closed:
            raise RequestError(503, "the service is shutting down")
        if len(self._waiting) >= self.limits.max_queue:
            raise RequestError(429, f"queue full: {len(self._waiting)} jobs waiting (limit "
                                    f"{self.limits.max_queue}); retry later")

    # -------------------------------------------------------------------------------------------- query
    def get(self, job_id: str) -> Job:
        """The job with this id; RequestError 404 for anything else (ids are never used as paths)."""
        job = self._jobs.get(job_id) if JOB_ID.match(job_id) else None
        if job is None:
            raise RequestError(404, f"unknown job id {job_id[:64]!r}")
        return job

    def write_downloads(self, job: Job) -> list[Path]:
        """The result of a finished job in every format of :data:`MESH_FORMATS`, ``mesh.glb`` first, the others
        written beside it; the results cap then counts them (this job's files stay). FileNotFoundError when the
        job has no result (the cap may have removed it)."""
        glb = job.file(f"{RESULT_NAME}.glb")
        if glb is None:
            raise FileNotFoundError(f"job {job.id}: no result (not finished, or removed by the results size cap)")
        data = {fmt: mesh_bytes(glb, fmt) for fmt in MESH_FORMATS if fmt != "glb"}  # the slow part, unlocked
        with self._cap_lock:
            if job.file(glb.name) is None:  # the cap removed it meanwhile: writing would recreate its folder
                raise FileNotFoundError(f"job {job.id}: the result was removed by the results size cap")
            paths = [glb, *(atomic_write_bytes(glb.with_suffix(f".{fmt}"), d) for fmt, d in data.items())]
        self._enforce_cap(keep=job)
        return paths

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        job.cancel.set()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self._finish(job, "cancelled", "cancelled")
        return job

    def queue_state(self) -> dict[str, Any]:
        with self._cond:
            return {"waiting": len(self._waiting), "running": self._running.id if self._running else None,
                    "max_queue": self.limits.max_queue}

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking jobs, cancel the queued and running ones, and wait for the worker."""
        with self._cond:
            self._closed = True
            for job in list(self._waiting):
                self._finish(job, "cancelled", "the service shut down")
            self._waiting.clear()
            if self._running is not None:
                self._running.cancel.set()
            self._cond.notify_all()
        self._thread.join(timeout)
        for h in self._hooks:
            h.remove()

    # -------------------------------------------------------------------------------------------- worker
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._waiting.popleft()
                self._running = job
            self._run(job)
            with self._cond:
                self._running = None

    def _run(self, job: Job) -> None:
        try:
            job.check()
        except JobStopped as stop:
            self._finish(job, str(stop), f"timed out after {self.limits.timeout_s:g} s in the queue"
                         if str(stop) == "timeout" else "cancelled")
            return
        job.status = "running"
        job.folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            job.result = job.work(job)
        except JobStopped as stop:
            shutil.rmtree(job.folder, ignore_errors=True)
            msg = f"timed out after {self.limits.timeout_s:g} s" if str(stop) == "timeout" else "cancelled"
            self._finish(job, str(stop), msg)
        except (ValueError, RuntimeError, FileNotFoundError) as err:
            shutil.rmtree(job.folder, ignore_errors=True)
            self._finish(job, "failed", str(err))
        except Exception as err:  # the worker must survive any job
            logger.exception("job %s failed", job.id)
            shutil.rmtree(job.folder, ignore_errors=True)
            self._finish(job, "failed", f"internal error: {type(err).__name__}: {err}")
        else:
            job.result["wall_seconds"] = round(time.perf_counter() - t0, 3)
            self._finish(job, "done", None)
        finally:
            self._free_device()

    def _finish(self, job: Job, status: str, error: str | None) -> None:
        job.status, job.error = status, error
        job.work = None  # the record is kept (up to Limits.max_jobs_kept), its inputs are not
        if status == "done":
            job.stage_index = job.stage_total
            self._enforce_cap(keep=job)  # before anyone waiting on the job looks at the folder
        job.finished.set()

    def _check_running(self, module: Any, args: Any) -> None:
        job = self._running
        if job is not None:
            job.check()

    def _free_device(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def _export(self, job: Job, mesh: Any, name: str) -> None:
        from ..geometry.export import export_mesh

        export_mesh(mesh, job.folder / f"{name}.glb")

    def _forget_old(self) -> None:
        # Finished job records beyond the limit are dropped with their files (oldest first).
        finished = [j for j in self._jobs.values() if j.finished.is_set()]
        for job in finished[: max(0, len(self._jobs) - self.limits.max_jobs_kept)]:
            del self._jobs[job.id]
            shutil.rmtree(job.folder, ignore_errors=True)

    def _enforce_cap(self, *, keep: Job) -> None:
        """Remove the oldest finished results until the folder is under the cap; ``keep`` (the job just finished,
        or whose downloads were just written) always stays."""
        with self._cond:
            done = [j for j in self._jobs.values() if j.status == "done"]
        with self._cap_lock:
            done = [j for j in done if not j.expired]
            sizes = {j.id: sum(f.stat().st_size for f in j.folder.glob("*") if f.is_file()) for j in done}
            total = sum(sizes.values())
            for job in done:  # insertion order = oldest first
                if total <= self.limits.results_cap_bytes:
                    break
                if job is keep:
                    continue
                job.expired = True  # first: a download that checks now gets 410, not a file about to vanish
                shutil.rmtree(job.folder, ignore_errors=True)
                total -= sizes[job.id]
                logger.info("results cap: removed the files of job %s", job.id)


def _summary(mesh: Any) -> dict[str, Any]:
    return {"vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces)),
            "watertight": bool(mesh.is_watertight)}


def _weights_band(weights: Path, pipe: Any) -> float | None:
    """The training band τ of the lowest sparse VAE, from the ``vae_task.json`` a training export writes."""
    from ..models.vae.export_info import read_task_file

    band = read_task_file(weights / f"sparse_vae_{pipe.resolutions[0]}").get("band")
    return None if band is None else float(band)


def mesh_bytes(path: Path, fmt: str) -> bytes:
    """A result GLB converted to ``fmt`` in memory (the downloads in other formats are not kept on disk)."""
    import trimesh

    if fmt not in MESH_FORMATS:
        raise RequestError(404, f"unknown format {fmt[:16]!r}: expected one of {', '.join(MESH_FORMATS)}")
    glb = path.read_bytes()  # once: FileNotFoundError if the results cap removed it, then nothing can vanish
    if fmt == "glb":
        return glb
    data = trimesh.load(io.BytesIO(glb), file_type="glb", force="mesh", process=False).export(file_type=fmt)
    return data.encode() if isinstance(data, str) else data  # OBJ is text

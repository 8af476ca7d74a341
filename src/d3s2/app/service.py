"""``d3s2 serve``: the JSON HTTP API (FastAPI) over an :class:`~d3s2.app.engine.Engine`.

Endpoints (the OpenAPI schema is at ``/openapi.json``, interactive docs at ``/docs``):

* ``POST /v1/generate``: ``multipart/form-data`` with an ``image`` file and optional fields ``resolution``,
  ``seed``, ``steps``, ``cfg``, ``faces`` → 202 ``{"id": ..., "status": "queued", ...}``. Errors: 400 empty
  upload or a malformed or incomplete (cut short) multipart body, 408 a body that stalls (nothing for 60 s), 413
  upload or image too large, 415 not an image, 422 bad parameter (out of range, a cfg that is no finite number)
  or an image no generation can use (smaller than 16 px a side, an empty alpha channel), 429 queue full, 503
  shutting down, or more uploads arriving at once than the queue could take.
* ``GET /v1/jobs/{id}``: status (``queued``, ``running``, ``done``, ``failed``, ``timeout``, ``cancelled``), the
  current stage and its index, progress in [0, 1], the result summary or the error. 404 for an unknown id.
* ``DELETE /v1/jobs/{id}``: cancel (a running job stops at its next stage or model call).
* ``GET /v1/jobs/{id}/mesh.glb`` (also ``.obj`` / ``.ply``): the mesh; 409 while not done, 410 once the results
  size cap removed it.
* ``GET /healthz``: device, resolutions and queue state.

The body is read with a byte cap and parsed in memory: an upload never touches the disk outside the engine's
output folder.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from .engine import (
    MAX_CFG,
    MAX_SEED,
    MESH_FORMATS,
    ArrivingUploads,
    Engine,
    GenerateParams,
    RequestError,
    mesh_bytes,
    read_image,
)

MEDIA_TYPES = {"glb": "model/gltf-binary", "obj": "model/obj", "ply": "application/octet-stream"}
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small parameter fields
BODY_STALL_S = 60.0  # a request body that sends nothing for this long is dropped (uvicorn never times a body out)


class GenerateForm(BaseModel):
    """The parameter fields of ``POST /v1/generate`` (the ``image`` file part comes beside them): their types.
    Their ranges are :meth:`Engine.check_generate`'s, one message per field for the API and the web app alike."""

    model_config = {"extra": "forbid"}

    resolution: int | None = Field(None, description="mesh resolution, one of /healthz 'resolutions' "
                                   "(default: the highest)")
    seed: int = Field(0, description=f"in [0, {MAX_SEED}]")
    steps: int | None = Field(None, description="sampling steps of every stage (default: per stage)")
    cfg: float | None = Field(None, description=f"guidance scale of every stage, in [0, {MAX_CFG:g}] (default: "
                                                "per stage)")
    faces: int | None = Field(None, description="decimate to about this many faces")


_GENERATE_BODY = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image"],
        "properties": {"image": {"type": "string", "format": "binary",
                                 "description": "PNG/JPEG/WebP/BMP/TIFF; RGBA with the object's alpha works best"},
                       "resolution": {"type": "integer"},
                       "seed": {"type": "integer", "default": 0, "minimum": 0, "maximum": MAX_SEED},
                       "steps": {"type": "integer", "minimum": 1}, "cfg": {"type": "number", "minimum": 0,
                                                                           "maximum": MAX_CFG},
                       "faces": {"type": "integer", "minimum": 1}}}}}},
}


def create_service(engine: Engine, *, close_engine: bool = True) -> FastAPI:
    """The FastAPI app; with ``close_engine`` the engine is closed when the server shuts down."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if close_engine:
            engine.close()

    from .. import __version__

    app = FastAPI(title="d3s2", version=__version__, lifespan=lifespan,
                  description="Direct3D-S2 image → watertight 3D mesh. Submit an image, poll the job, fetch the "
                              "mesh.")

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError) -> JSONResponse:
        headers = {"Retry-After": "5"} if err.status in (429, 503) else None
        return JSONResponse({"detail": err.message}, status_code=err.status, headers=headers)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "device": engine.device, "resolutions": engine.pipeline.resolutions,
                "queue": engine.queue_state()}

    # Bodies are read into memory: as many at once as the queue can take, beyond which they would end in 429.
    max_body = engine.limits.max_upload_bytes + FORM_OVERHEAD
    arriving = ArrivingUploads((engine.limits.max_queue + 1) * max_body,
                               f"what the server receives at once (--max-queue + 1 = {engine.limits.max_queue + 1} "
                               "uploads of the largest size)")

    @app.post("/v1/generate", status_code=202, openapi_extra=_GENERATE_BODY)
    async def generate(request: Request) -> dict[str, Any]:
        engine.check_accepting()
        with arriving.admit(_body_bound(request, engine.limits.max_upload_bytes)):
            image_bytes, fields = await _read_form(request, engine.limits.max_upload_bytes)
            try:
                form = GenerateForm.model_validate(fields)
            except ValidationError as err:
                raise RequestError(422, "bad parameters: " + "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or 'form'}: {e['msg']}" for e in err.errors())) from err
            params = GenerateParams(**form.model_dump())
            engine.check_generate(params)  # before the upload is decoded
            image = await run_in_threadpool(read_image, image_bytes, engine.limits)  # decoding blocks: off the loop
        job = engine.submit_generate(image, params)
        return job.to_dict()

    @app.get("/v1/jobs/{job_id}")
    def job_status(job_id: str) -> dict[str, Any]:
        return engine.get(job_id).to_dict()

    @app.delete("/v1/jobs/{job_id}")
    def job_cancel(job_id: str) -> dict[str, Any]:
        return engine.cancel(job_id).to_dict()

    @app.get("/v1/jobs/{job_id}/mesh.{fmt}", responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}})
    def job_mesh(job_id: str, fmt: str) -> Response:
        job = engine.get(job_id)
        if fmt not in MESH_FORMATS:
            raise RequestError(404, f"unknown format {fmt[:16]!r}: expected one of {', '.join(MESH_FORMATS)}")
        if job.expired:
            raise RequestError(410, job.removed_message)
        path = job.file("mesh.glb")
        if path is None:
            raise RequestError(409, f"job {job.id} is {job.status}: no mesh" + (f" ({job.error})" if job.error
                                                                               else ""))
        try:
            data = mesh_bytes(path, fmt)
        except FileNotFoundError:  # the results cap removed it after the check above
            raise RequestError(410, job.removed_message) from None
        return Response(data, media_type=MEDIA_TYPES[fmt],
                        headers={"Content-Disposition": f'attachment; filename="{job.id}.{fmt}"'})

    return app


class _MultiPartBody(MultiPartParser):
    """Starlette's multipart parser, noting whether the body reached its closing boundary: a body cut short
    parses without error, as a form that lacks its last parts (python-multipart's finalize() does not check)."""

    complete = False

    def on_end(self) -> None:
        self.complete = True


def _body_bound(request: Request, max_upload: int) -> int:
    """The most bytes the body can have (its declared length, or the limit), once its headers pass: 415 not a
    form, 413 declared too large."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise RequestError(415, f"expected a multipart/form-data body with an 'image' file, got {ctype or 'none'}")
    cap = max_upload + FORM_OVERHEAD
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise RequestError(413, f"upload too large: {declared} bytes, the limit is {max_upload}")
    return int(declared) if declared.isdigit() else cap


async def _read_form(request: Request, max_upload: int) -> tuple[bytes, dict[str, str]]:
    """(image bytes, other fields) of a multipart body read with a byte cap, all in memory (its headers checked
    by :func:`_body_bound`)."""
    cap = max_upload + FORM_OVERHEAD
    declared = request.headers.get("content-length")
    received = 0

    async def capped():
        nonlocal received
        chunks = request.stream()
        while True:
            try:
                chunk = await asyncio.wait_for(anext(chunks), BODY_STALL_S)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:  # a client that declared more than it sends and holds the connection open
                raise RequestError(408, f"request body stalled: nothing arrived for {BODY_STALL_S:g} s after "
                                        f"{received} bytes" + (f" of the {declared} declared" if declared else "")
                                   ) from None
            received += len(chunk)
            if received > cap:
                raise RequestError(413, f"upload too large: more than {max_upload} bytes")
            yield chunk

    parser = _MultiPartBody(request.headers, capped(), max_files=1, max_fields=16, max_part_size=1024)
    parser.spool_max_size = cap  # keep the file part in memory: nothing is written to the system temp folder
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise RequestError(400, f"malformed form: {err.message}") from err
    except ClientDisconnect:  # no one reads this answer, but it is no server error to log with a traceback
        raise RequestError(400, f"incomplete request body: the connection closed after {received} bytes"
                                + (f" of the {declared} declared" if declared else "")) from None
    if not parser.complete:
        raise RequestError(400, f"incomplete multipart body: the {received} bytes sent end before the form's "
                                "closing boundary (a cut upload?); send the whole form")
    image = form.get("image")
    if not isinstance(image, UploadFile):
        raise RequestError(400, "missing the 'image' file field")
    data = await image.read()
    await image.close()
    fields = {k: v for k, v in form.multi_items() if k != "image" and isinstance(v, str) and v != ""}
    return data, fields

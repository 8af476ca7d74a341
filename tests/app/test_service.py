"""`d3s2 serve` in a subprocess on localhost, driven over HTTP with the tiny random pipeline."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import time
import uuid

import numpy as np
import pytest
import trimesh

from d3s2.geometry.render import encode_png

from ..pipeline.tiny import png_header_only, rgba_image, tiny_pipeline
from .conftest import Server, pid_alive, port_open

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

MAX_PIXELS = 200_000
MAX_UPLOAD_MB = 0.25


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    srv = Server("serve", tiny_weights, root / "out", root / "cwd", "--max-queue", "1", "--max-pixels",
                 str(MAX_PIXELS), "--max-upload-mb", str(MAX_UPLOAD_MB), "--timeout", "60", ready_path="/healthz")
    yield srv
    srv.kill()  # only if a test failed before test_shutdown_leaves_nothing_running


def _post(server, data: bytes, filename: str = "in.png", **fields) -> httpx.Response:
    return httpx.post(server.url + "/v1/generate", files={"image": (filename, data, "image/png")},
                      data={k: str(v) for k, v in fields.items()}, timeout=30)


def _wait(server, job_id: str, status=("done", "failed", "timeout", "cancelled"), timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=10)
        assert r.status_code == 200, r.text
        job = r.json()
        if job["status"] in status:
            return job
        assert time.monotonic() < deadline, f"job still {job['status']} after {timeout} s"
        time.sleep(0.1)


def _detail(r: httpx.Response) -> str:
    return r.json()["detail"]


def test_health_and_openapi(server):
    r = httpx.get(server.url + "/healthz")
    assert r.status_code == 200
    assert r.json()["resolutions"] == [64, 128] and r.json()["device"] == "cpu"
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert {"/v1/generate", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/mesh.{fmt}", "/healthz"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/generate"]["post"]["requestBody"]["content"]


def test_generate_round_trip(server):
    r = _post(server, encode_png(rgba_image()), resolution=64, seed=0, steps=1)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert uuid.UUID(hex=job_id).hex == job_id and r.json()["status"] in ("queued", "running")
    job = _wait(server, job_id)
    assert job["status"] == "done", job
    assert job["progress"] == 1.0 and job["stage_index"] == job["stage_total"] == 5  # prepare … post
    r = httpx.get(f"{server.url}/v1/jobs/{job_id}/mesh.glb")
    assert r.status_code == 200 and r.headers["content-type"] == "model/gltf-binary"
    mesh = trimesh.load(io.BytesIO(r.content), file_type="glb", force="mesh")
    assert len(mesh.faces) == job["result"]["faces"] > 0
    assert mesh.is_watertight == job["result"]["watertight"]
    obj = httpx.get(f"{server.url}/v1/jobs/{job_id}/mesh.obj")
    assert obj.status_code == 200
    assert len(trimesh.load(io.BytesIO(obj.content), file_type="obj", force="mesh").faces) == len(mesh.faces)
    # The result lives in the output folder under the server-made id, and nothing else was written.
    assert (server.out / "jobs" / job_id / "mesh.glb").is_file()
    assert not list((server.out.parent / "cwd").iterdir())


def _png(width: int, height: int) -> bytes:
    img = np.zeros((height, width, 4), np.uint8)
    img[height // 4: height // 2, width // 4: width // 2] = 255
    return encode_png(img)


@pytest.mark.parametrize("case, status, message", [
    ("not an image", 415, "not an image"),
    ("empty file", 400, "empty upload"),
    ("too many pixels", 413, "image too large: 600x400 = 240000 pixels, the limit is 200000"),
    ("decompression bomb", 413, "image too large (Image size (10000000000 pixels) exceeds limit"),
    ("too small", 422, "image too small: expected at least 16x16 pixels, got 8x8"),
    ("empty alpha", 422, "the image's alpha channel is empty"),
    ("too many bytes", 413, "upload too large"),
    ("no image field", 400, "missing the 'image' file field"),
    ("cut body", 400, "incomplete multipart body: the "),
    ("cut before the closing boundary", 400, "incomplete multipart body: the "),
    ("not multipart", 415, "expected a multipart/form-data body"),
    ("bad seed", 422, "seed"),
    ("nan cfg", 422, "expected cfg to be a finite number in [0, 50], got nan"),
    ("inf cfg", 422, "expected cfg to be a finite number in [0, 50], got inf"),
    ("bad resolution", 422, "expected resolution in [64, 128], got 512"),
    ("unknown field", 422, "bogus"),
])
def test_bad_uploads(server, case, status, message):
    good = encode_png(rgba_image())
    if case == "not an image":
        r = _post(server, b"%PDF-1.4 this is not a picture", filename="x.png")
    elif case == "empty file":
        r = _post(server, b"")
    elif case == "too many pixels":
        r = _post(server, _png(600, 400))
    elif case == "decompression bomb":
        r = _post(server, png_header_only(100_000, 100_000))
    elif case == "too small":
        r = _post(server, encode_png(rgba_image(8)))
    elif case == "empty alpha":
        r = _post(server, encode_png(rgba_image() * 0))
    elif case == "too many bytes":
        r = _post(server, np.random.default_rng(0).bytes(int(MAX_UPLOAD_MB * 2**20) + 70_000))
    elif case == "no image field":
        r = httpx.post(server.url + "/v1/generate", files={"picture": ("in.png", good, "image/png")})
    elif case.startswith("cut"):  # a complete form, then sent short: half of it, or all but its last bytes
        form = httpx.Request("POST", server.url, files={"image": ("in.png", good, "image/png")}, data={"seed": "1"})
        body = form.read()
        r = httpx.post(server.url + "/v1/generate", content=body[: len(body) // 2 if case == "cut body" else -8],
                       headers={"content-type": form.headers["content-type"]})
    elif case == "not multipart":
        r = httpx.post(server.url + "/v1/generate", content=good, headers={"content-type": "image/png"})
    elif case == "bad seed":
        r = _post(server, good, seed=-1)
    elif case.endswith("cfg"):
        r = _post(server, good, cfg=case.split()[0])
    elif case == "bad resolution":
        r = _post(server, good, resolution=512)
    else:
        r = _post(server, good, bogus=1)
    assert r.status_code == status, r.text
    assert message in _detail(r)
    assert httpx.get(server.url + "/healthz").json()["queue"]["waiting"] == 0  # nothing was queued


@pytest.mark.parametrize("path, status, message", [
    ("/v1/jobs/" + "0" * 32, 404, "unknown job id"),
    ("/v1/jobs/not-a-job", 404, "unknown job id"),
    ("/v1/jobs/%2e%2e%2f%2e%2e%2fetc%2fpasswd", 404, ""),
    ("/v1/jobs/" + "0" * 32 + "/mesh.glb", 404, "unknown job id"),
])
def test_unknown_jobs(server, path, status, message):
    r = httpx.get(server.url + path)
    assert r.status_code == status
    assert message in r.text


def test_queue_full_then_cancel(server):
    png = encode_png(rgba_image())
    # Many steps through the 128³ cascade: seconds of work, so the worker is busy while we fill the queue.
    running = _post(server, png, resolution=128, steps=100).json()["id"]
    _wait(server, running, status=("running",), timeout=30)
    waiting = _post(server, png, resolution=64, steps=1)
    assert waiting.status_code == 202, waiting.text
    full = _post(server, png, resolution=64, steps=1)
    assert full.status_code == 429
    assert _detail(full) == "queue full: 1 jobs waiting (limit 1); retry later"
    assert full.headers["retry-after"]
    # refused before the upload is read or decoded: a body that is no image gets the 429 too, not a 415
    assert _post(server, b"not an image", resolution=64, steps=1).status_code == 429
    r = httpx.get(f"{server.url}/v1/jobs/{running}/mesh.glb")
    assert r.status_code == 409 and "is running" in _detail(r)
    for job_id in (waiting.json()["id"], running):
        assert httpx.delete(f"{server.url}/v1/jobs/{job_id}").status_code == 200
    assert _wait(server, running, timeout=30)["status"] == "cancelled"  # stopped at its next model call
    assert _wait(server, waiting.json()["id"])["status"] == "cancelled"
    assert not (server.out / "jobs" / running).exists()
    r = httpx.get(f"{server.url}/v1/jobs/{running}/mesh.glb")
    assert r.status_code == 409 and "cancelled" in _detail(r)


@pytest.mark.parametrize("fmt", ["glb", "obj"])
def test_a_result_removed_while_it_is_read_is_gone_not_an_error(tmp_path, monkeypatch, fmt):
    from fastapi.testclient import TestClient

    from d3s2.app import service
    from d3s2.app.engine import Engine, GenerateParams

    engine = Engine(tiny_pipeline(), tmp_path / "out", device="cpu")
    job = engine.submit_generate(rgba_image(), GenerateParams(resolution=64, steps=1))
    assert job.finished.wait(60) and job.status == "done", job.error
    real_mesh_bytes = service.mesh_bytes

    def removed_by_the_cap_first(path, fmt):
        (path.parent / "mesh.glb").unlink()  # the cap's delete, between the endpoint's check and its read
        return real_mesh_bytes(path, fmt)

    monkeypatch.setattr(service, "mesh_bytes", removed_by_the_cap_first)
    with TestClient(service.create_service(engine), raise_server_exceptions=False) as client:
        r = client.get(f"/v1/jobs/{job.id}/mesh.{fmt}")
    assert r.status_code == 410, r.text
    assert r.json()["detail"] == f"job {job.id}: the result was removed (results size cap)"


def _post_cut_upload(tmp_path, after_first_part) -> tuple[list[dict], int]:
    """POST /v1/generate straight to the ASGI app (no HTTP server in between): the body's first 100 bytes, then
    ``after_first_part()`` for every later receive. The messages sent back, and the declared body length."""
    import asyncio

    from d3s2.app import service
    from d3s2.app.engine import Engine

    form = httpx.Request("POST", "http://test/v1/generate", files={"image": ("in.png", encode_png(rgba_image()))})
    body = form.read()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/generate", "raw_path": b"/v1/generate", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", form.headers["content-type"].encode()),
                         (b"content-length", str(len(body)).encode())]}
    first = [{"type": "http.request", "body": body[:100], "more_body": True}]
    sent = []

    async def receive():
        return first.pop() if first else await after_first_part()

    async def send(message):
        sent.append(message)

    engine = Engine(tiny_pipeline(), tmp_path / "out", device="cpu")
    try:
        asyncio.run(asyncio.wait_for(service.create_service(engine, close_engine=False)(scope, receive, send), 10))
    finally:
        engine.close()
    return sent, len(body)


def test_a_client_that_leaves_mid_upload_is_no_server_error(tmp_path):
    # Its body ends early: a 400 that says so (no one reads it), not a traceback in the server's log.
    async def disconnect():
        return {"type": "http.disconnect"}

    sent, declared = _post_cut_upload(tmp_path, disconnect)
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["detail"] == (f"incomplete request body: the connection closed after 100 "
                                                     f"bytes of the {declared} declared")


def test_a_stalled_upload_is_dropped(tmp_path, monkeypatch):
    # A client that declares more than it sends and keeps the connection open: 408 once nothing arrives for
    # BODY_STALL_S (uvicorn would wait forever, holding the request).
    import asyncio

    from d3s2.app import service

    monkeypatch.setattr(service, "BODY_STALL_S", 0.2, raising=False)

    async def silence():
        await asyncio.sleep(3600)

    sent, declared = _post_cut_upload(tmp_path, silence)
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"])["detail"] == (f"request body stalled: nothing arrived for 0.2 s after 100 "
                                                     f"bytes of the {declared} declared")


def test_more_uploads_at_once_than_the_queue_takes_are_refused(tmp_path):
    # Bodies are read into memory: five undeclared (chunked) ones, each counted at the upload limit, fill what the
    # server receives at once with the default queue of 4; a sixth is refused with 503 before its body is read, and
    # once the five are gone, uploads pass again.
    import asyncio

    from d3s2.app import service
    from d3s2.app.engine import Engine, Limits

    boundary = "x" * 16
    headers = [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())]
    gone = asyncio.Event()

    async def post(body_ends: bool) -> tuple[int, str]:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/generate", "raw_path": b"/v1/generate", "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
                 "headers": headers}
        sent = []
        first = [{"type": "http.request", "body": f"--{boundary}\r\n".encode(), "more_body": not body_ends}]

        async def receive():
            if first:
                return first.pop()
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)
        return sent[0]["status"], json.loads(sent[1]["body"])["detail"]

    async def at_once():
        stalled = [asyncio.create_task(post(body_ends=False)) for _ in range(5)]
        await asyncio.sleep(0.2)  # all five are reading their bodies
        refused = await post(body_ends=True)
        gone.set()
        return refused, await asyncio.gather(*stalled), await post(body_ends=True)

    engine = Engine(tiny_pipeline(), tmp_path / "out", device="cpu", limits=Limits(max_upload_bytes=1000))
    try:
        app = service.create_service(engine, close_engine=False)
        refused, stalled, after = asyncio.run(asyncio.wait_for(at_once(), 10))
    finally:
        engine.close()
    body = 1000 + service.FORM_OVERHEAD
    assert refused == (503, f"busy: {5 * body} bytes of other uploads are arriving, and with these {body} they would "
                            f"exceed what the server receives at once (--max-queue + 1 = 5 uploads of the largest "
                            f"size) ({5 * body} bytes); retry in a few seconds")
    assert [status for status, _ in stalled] == [400] * 5  # their clients went away
    assert after[0] == 400 and after[1].startswith("incomplete multipart body")  # not refused: the five are gone


def test_shutdown_leaves_nothing_running(server):
    children = server.children()
    assert server.stop() == 130, server.log.read_text()  # Ctrl-C, as for every d3s2 command
    assert server.log.read_text().endswith("d3s2 serve: interrupted\n")
    assert not port_open(server.port)
    assert not [p for p in [server.proc.pid, *children] if pid_alive(p)]


def test_a_server_started_with_sigint_ignored_serves_on_through_it(tiny_weights, tmp_path):
    # `d3s2 serve &` in a script: the shell ignores SIGINT in it, so that a Ctrl-C at the terminal leaves it serving.
    # uvicorn shut down on it all the same, and its re-raise of the signal, ignored, ended the command with 0.
    server = Server("serve", tiny_weights, tmp_path / "out", tmp_path / "cwd", ready_path="/healthz",
                    sigint_ignored=True)
    try:
        server.proc.send_signal(signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):
            server.proc.wait(3)
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
    finally:
        code = server.stop(signum=signal.SIGTERM)
    assert code == 143 and server.log.read_text().endswith("d3s2 serve: terminated\n"), server.log.read_text()

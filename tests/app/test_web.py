"""The web app in-process: the preview of the conditioner input, its messages, the files Gradio keeps (under a
cap) and the answers of its file routes."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from d3s2.pipeline.image_to_3d import ImageTo3DPipeline

from ..pipeline.tiny import rgba_image, tiny_pipeline

pytest.importorskip("gradio")


def _png(tmp_path) -> str:
    path = tmp_path / "in.png"
    Image.fromarray(rgba_image(40)).save(path)
    return str(path)


@pytest.mark.parametrize("own_encoders", [False, True])
def test_preview_uses_the_first_stage_encoder(tmp_path, own_encoders):
    from d3s2.app.engine import Limits
    from d3s2.app.web import preview

    pipe = tiny_pipeline()
    if own_encoders:  # as the trained demo pipeline: no shared conditioner, one encoder per DiT
        own = {n: pipe.conditioner for n in ("dense_dit", *[f"sparse_dit_{r}" for r in pipe.resolutions])}
        pipe = ImageTo3DPipeline(None, pipe.dense_dit, pipe.dense_vae, pipe.sparse_dits, pipe.sparse_vaes,
                                 pipe.settings, conditioners=own)
    out = preview(SimpleNamespace(pipeline=pipe, limits=Limits()), _png(tmp_path))
    size = max(pipe.encoder_for("dense_dit").image_size, 256)
    assert out.shape == (size, 2 * size, 3) and out.dtype == np.uint8
    mask = out[:, size:, 0]
    assert 0 < (mask > 127).mean() < 1  # the foreground mask is neither empty nor everything


@pytest.mark.parametrize(("data", "message"), [
    (b"notes, not pixels", "not an image"),
    (None, "image too small: expected at least 16x16 pixels, got 8x8"),
])
def test_preview_of_a_bad_upload_is_a_message_not_a_server_traceback(tmp_path, data, message):
    import gradio as gr

    from d3s2.app.engine import Limits
    from d3s2.app.web import preview

    path = tmp_path / "in.png"
    if data is None:
        Image.fromarray(rgba_image(8)).save(path)
    else:
        path.write_bytes(data)
    with pytest.raises(gr.Error) as err:
        preview(SimpleNamespace(pipeline=tiny_pipeline(), limits=Limits()), str(path))
    assert err.value.message.startswith(message) and err.value.duration is None
    assert err.value.print_exception is False  # Gradio prints the traceback of an Error unless told not to


def test_a_result_removed_by_the_cap_before_its_downloads_is_a_message(tmp_path):
    import gradio as gr

    from d3s2.app.engine import Engine, GenerateParams, Limits
    from d3s2.app.web import _downloads

    engine = Engine(tiny_pipeline(), tmp_path / "out", limits=Limits(results_cap_bytes=1), band=2 / 64)
    try:
        first, second = (engine.submit_generate(rgba_image(), GenerateParams(resolution=64, steps=1))
                         for _ in range(2))
        assert second.finished.wait(60) and second.status == "done", second.error
        assert first.expired  # the cap at the second job's end removed it
        with pytest.raises(gr.Error) as err:
            _downloads(engine, first)
        assert "the result was removed (results size cap)" in err.value.message
        assert err.value.print_exception is False
        assert [Path(p).name for p in _downloads(engine, second)] == ["mesh.glb", "mesh.obj", "mesh.ply"]
    finally:
        engine.close()



@pytest.fixture
def gradio_folder(tmp_path, monkeypatch) -> Path:
    """Gradio's folder for the app built in this test."""
    folder = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder))  # read by each Gradio block as it is built
    monkeypatch.setattr("gradio.data_classes._StaticFiles.all_paths", [])  # process-wide: restored after
    return folder


def test_results_are_served_from_their_job_folder_not_copied_into_gradios_cache(tmp_path, gradio_folder):
    # A copy in Gradio's cache would escape the results cap, and outlive the removal of its job's files.
    from d3s2.app.engine import Engine
    from d3s2.app.web import GradioFiles, build_app

    engine = Engine(tiny_pipeline(), tmp_path / "out", band=2 / 64)
    try:
        app = build_app(engine, GradioFiles(gradio_folder, 2**20))
        generate = next(f for f in app.fns.values() if f.name == "generate")
        viewer, files, summary = generate.fn(_png(tmp_path), 64, 0, 1, 0, 0)
        # What Gradio does with an event's return value before the page gets it (copies files, makes URLs).
        shown = asyncio.run(app.postprocess_data(generate, [viewer, files, summary], None))
        shown_paths = [Path(shown[0]["path"]), *(Path(f["path"]) for f in shown[1])]
        assert shown_paths == [Path(viewer), *map(Path, files)]
        assert all(p.parent.parent == engine.jobs_dir for p in shown_paths)
        assert not list(gradio_folder.rglob("mesh.*"))
    finally:
        engine.close()


def _gradio_copy(folder: Path, name: str, data: bytes, age_s: float) -> Path:
    """A file as Gradio keeps an upload: ``<sha256 of its content>/<name>``, last written ``age_s`` ago."""
    path = folder / hashlib.sha256(data).hexdigest() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (time.time() - age_s,) * 2)
    return path


def test_gradios_files_stay_under_their_cap_least_recently_used_first(tmp_path):
    from d3s2.app.web import STALE_TEMP_S, GradioFiles, _read_upload

    (tmp_path / "disk").mkdir()
    folder = tmp_path / "gradio"  # named through a link, as GRADIO_TEMP_DIR may be
    folder.symlink_to(tmp_path / "disk")
    earlier_run = [_gradio_copy(folder, "old.png", b"o" * 10, 0), folder / "tmp0abc_xyz"]
    earlier_run[1].write_bytes(b"")
    not_gradios = folder / "notes.txt"
    not_gradios.write_text("an operator's own file")
    files = GradioFiles(folder, cap_bytes=250)
    files.remove_all()
    assert not any(p.exists() for p in earlier_run) and not earlier_run[0].parent.exists()
    assert not_gradios.exists()

    example = _gradio_copy(folder, "example.png", b"e" * 100, 1000)  # cached while the app was built
    served = [{str(example)}, set()]  # the app's path sets: its uploads', and a component's (its previews)
    files.keep_current(SimpleNamespace(temp_file_sets=served))
    uploads = [_gradio_copy(folder, f"u{i}.png", bytes([i]) * 100, 100 - 10 * i) for i in range(3)]
    served[0].update(str(p) for p in uploads)  # Gradio's names: the folder as given
    served[1].add(str(uploads[2].resolve()))
    abandoned = folder / "tmpabandon1"  # an upload whose client went away
    abandoned.write_bytes(b"p" * 50)
    os.utime(abandoned, (time.time() - STALE_TEMP_S - 1,) * 2)
    arriving = folder / "tmparriving"  # an upload still arriving, or gr.File's empty file of this event
    arriving.write_bytes(b"")
    assert _read_upload(str(uploads[0]), "") == b"\0" * 100  # read again: now the most recently used

    files.trim()  # 100 + 300 + 50 bytes: the abandoned upload goes, then u1 and u2 (u0 was read since)
    assert [p.exists() for p in uploads] == [True, False, False]
    assert not uploads[1].parent.exists()  # the hash folder with it
    assert example.exists() and arriving.exists() and not abandoned.exists() and not_gradios.exists()
    assert served == [{str(example), str(uploads[0])}, set()]  # the removed files' paths are forgotten too
    files.trim()
    assert uploads[0].exists()  # alone above the cap: the newest always stays
    files.cap_bytes = 0
    files.trim()
    assert uploads[0].exists() and example.exists()


def test_a_copy_unused_past_its_age_goes_under_the_cap_too(tmp_path):
    from d3s2.app.web import GradioFiles

    files = GradioFiles(tmp_path, cap_bytes=2**20, max_age_s=600)
    example = _gradio_copy(tmp_path, "example.png", b"e", 5000)
    files.keep_current(SimpleNamespace(temp_file_sets=[]))
    old, recent = (_gradio_copy(tmp_path, f"{name}.png", name.encode(), age)
                   for name, age in (("old", 601), ("recent", 500)))
    files.trim()
    assert (example.exists(), old.exists(), recent.exists()) == (True, False, True)
    os.utime(recent, (time.time() - 700,) * 2)
    files.trim()  # the newest too, once past its age (above the cap it would stay: it is the upload just made)
    assert not recent.exists() and example.exists()


def test_the_app_trims_its_folder_on_a_schedule_and_empties_it_at_shutdown(tmp_path, gradio_folder, monkeypatch):
    # The app's own sweep replaces Gradio's delete_cache one, which iterated the path sets in a worker thread while
    # trim() took paths out of them from another: "set changed size during iteration" stopped it.
    from fastapi.testclient import TestClient

    from d3s2.app.engine import Engine
    from d3s2.app.web import GradioFiles, serve_app

    gradio_sweeps = []
    monkeypatch.setattr("gradio.route_utils.delete_files_on_schedule",
                        lambda *args: gradio_sweeps.append(args) or asyncio.sleep(0))
    engine = Engine(tiny_pipeline(), tmp_path / "out", band=2 / 64)
    try:
        files = GradioFiles(gradio_folder, 2**20, max_age_s=60)
        server = serve_app(engine, files, host="127.0.0.1", port=7860, sweep_every_s=0.05)
        with TestClient(server):  # runs the app's lifespan: startup, then shutdown on leaving
            old = _gradio_copy(gradio_folder, "old.png", b"o", 61)
            _gradio_copy(gradio_folder, "new.png", b"n", 0)
            deadline = time.monotonic() + 10
            while old.exists() and time.monotonic() < deadline:  # no request: only the schedule can remove it
                time.sleep(0.02)
            assert not old.exists()
            assert len(list(gradio_folder.rglob("*.png"))) >= 2  # the new copy and the example images stay
        assert gradio_sweeps == []
        assert not list(gradio_folder.rglob("*.png"))
    finally:
        engine.close()


def test_uploads_arriving_at_once_leave_room_under_the_cap(tmp_path):
    # Two uploads arrive together, under a cap of 1000 bytes: the first is let through once the folder has room
    # for its declared 600 bytes (the older copies go); a second one of 600 bytes while the first arrives would take
    # the folder beyond the cap (503), one of 300 passes after the folder made room for both.
    from d3s2.app.web import API_PREFIX, GradioFiles, UploadLimit

    folder = tmp_path / "gradio"
    folder.mkdir()
    files = GradioFiles(folder, cap_bytes=1000)
    files.keep_current(SimpleNamespace(temp_file_sets=[]))  # no example images
    older = [_gradio_copy(folder, f"old{i}.png", bytes([i]) * 300, 100 - i) for i in range(3)]  # the last the newest
    inside = asyncio.Event()
    release = asyncio.Event()
    passed_with = []

    async def gradio(scope, receive, send):  # stands in for Gradio's upload route, until released
        passed_with.append(sorted(p.name for p in folder.rglob("*.png")))
        inside.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"[]"})

    limit = UploadLimit(gradio, max_upload_bytes=2**20, files=files)

    async def upload(size):
        answers = []
        scope = {"type": "http", "method": "POST", "path": f"{API_PREFIX}/upload",
                 "headers": [(b"content-length", str(size).encode())]}

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            answers.append(message)

        await limit(scope, receive, send)
        return answers[0]["status"], b"".join(m.get("body", b"") for m in answers[1:]).decode()

    async def together():
        first = asyncio.create_task(upload(600))
        await inside.wait()
        refused = await upload(600)
        inside.clear()
        second = asyncio.create_task(upload(300))
        await inside.wait()
        release.set()
        return refused, await first, await second

    refused, first, second = asyncio.run(asyncio.wait_for(together(), 10))
    assert refused == (503, "busy: 600 bytes of other uploads are arriving, and with these 600 they would exceed "
                            "the uploads cap (1000 bytes); retry in a few seconds")
    assert first == second == (200, "[]") and limit.arriving.bytes == 0
    assert passed_with == [["old2.png"], ["old2.png"]]  # 300 bytes + 600 arriving, then + 900 (the newest stays)
    assert not older[0].exists() and not older[1].exists()


def test_an_upload_removed_above_the_cap_is_a_message(tmp_path, gradio_folder):
    import gradio as gr

    from d3s2.app.engine import Engine
    from d3s2.app.web import GradioFiles, build_app

    engine = Engine(tiny_pipeline(), tmp_path / "out", band=2 / 64)
    try:
        app = build_app(engine, GradioFiles(gradio_folder, 2**20))
        generate = next(f for f in app.fns.values() if f.name == "generate")
        with pytest.raises(gr.Error) as err:
            generate.fn(str(gradio_folder / ("0" * 64) / "in.png"), 64, 0, 1, 0, 0)
        assert err.value.message == "the upload was removed (the server's space for uploads is full): upload it again"
    finally:
        engine.close()


def _png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgba_image(40 + seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_uploads_are_capped_per_request_and_trimmed_after_each(tmp_path, gradio_folder):
    from fastapi.testclient import TestClient

    from d3s2.app.engine import Engine, Limits
    from d3s2.app.web import GradioFiles, example_images, serve_app

    engine = Engine(tiny_pipeline(), tmp_path / "out", limits=Limits(max_upload_bytes=2**20), band=2 / 64)
    try:
        server = serve_app(engine, GradioFiles(gradio_folder, 1), host="127.0.0.1", port=7860)
        client = TestClient(server)
        blocks = next(route.app for route in server.routes if hasattr(route.app, "get_blocks")).get_blocks()
        examples = sorted(gradio_folder.rglob("*.png"))
        assert len(examples) == len(example_images())  # cached while the app was built: they stay
        for seed in range(3):
            answer = client.post("/gradio_api/upload", files={"files": (f"in{seed}.png", _png_bytes(seed))})
            assert answer.status_code == 200, answer.text
            upload = Path(answer.json()[0])
            assert upload.read_bytes() == _png_bytes(seed)
            # One byte of cap: of the uploads only the newest stays, and the examples the page shows.
            assert sorted(gradio_folder.rglob("*.png")) == sorted([*examples, upload])
            assert blocks.upload_file_set == {str(upload)}  # Gradio forgets the removed ones too

        # Gradio alone would take up to 1000 files of max_file_size in one request; nothing of these is written.
        too_large = client.post("/gradio_api/upload",
                                files=[("files", (f"{i}.png", b"x" * 2**19)) for i in range(3)])
        declared = too_large.request.headers["content-length"]
        assert (too_large.status_code, too_large.text) == (413, f"upload too large: {declared} bytes, the limit is "
                                                                f"{2**20}")
        undeclared = client.post("/gradio_api/upload", content=iter([b"--x--\r\n"]),
                                 headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert undeclared.status_code == 411
        assert sorted(gradio_folder.rglob("*.png")) == sorted([*examples, upload])
        assert not [p for p in gradio_folder.iterdir() if p.is_file()]  # no partial upload left either
    finally:
        engine.close()


def test_a_link_to_a_result_removed_by_the_cap_answers_410(tmp_path, gradio_folder):
    from fastapi.testclient import TestClient

    from d3s2.app.engine import Engine, GenerateParams, Limits
    from d3s2.app.web import GradioFiles, serve_app

    engine = Engine(tiny_pipeline(), tmp_path / "out", limits=Limits(results_cap_bytes=1), band=2 / 64)
    try:
        client = TestClient(serve_app(engine, GradioFiles(gradio_folder, 2**20), host="127.0.0.1", port=7860))
        removed, kept = (engine.submit_generate(rgba_image(), GenerateParams(resolution=64, steps=1))
                         for _ in range(2))
        assert kept.finished.wait(60) and kept.status == "done", kept.error
        assert removed.expired
        answer = client.get(f"/gradio_api/file={removed.folder / 'mesh.glb'}")
        assert answer.status_code == 410
        assert answer.json() == {"detail": f"job {removed.id}: the result was removed (results size cap); run it "
                                           "again"}
        assert client.head(f"/gradio_api/file={removed.folder / 'mesh.glb'}").status_code == 410
        assert client.get(f"/gradio_api/file={kept.folder / 'mesh.glb'}").content == (kept.folder
                                                                                      / "mesh.glb").read_bytes()
        # A job the engine does not know (forgotten, or never made): 404 with the reason, as the API answers.
        answer = client.get(f"/gradio_api/file={engine.jobs_dir / ('0' * 32) / 'mesh.glb'}")
        assert answer.status_code == 404 and answer.json()["detail"].startswith(f"unknown job id {'0' * 32!r}")
        # Anything else is Gradio's to answer, as before: a path outside the jobs folder (reached through a
        # removed job's folder too).
        secret = tmp_path / "secret.txt"
        secret.write_text("not to be served")
        for path in (str(secret), f"{removed.folder}/%2E%2E/%2E%2E/%2E%2E/secret.txt"):
            answer = client.get(f"/gradio_api/file={path}")
            assert answer.status_code == 403 and answer.json()["detail"].startswith("File not allowed"), path
    finally:
        engine.close()


def test_an_upload_cut_short_is_no_server_error_and_its_partial_file_goes_once_stale(tmp_path, gradio_folder):
    from d3s2.app.engine import Engine
    from d3s2.app.web import STALE_TEMP_S, GradioFiles, serve_app

    engine = Engine(tiny_pipeline(), tmp_path / "out", band=2 / 64)
    try:
        files = GradioFiles(gradio_folder, 2**20)
        app = serve_app(engine, files, host="127.0.0.1", port=7860)
        part = (b'--x\r\nContent-Disposition: form-data; name="files"; filename="in.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + b"\0" * 1000)
        messages = iter([{"type": "http.request", "body": part, "more_body": True}, {"type": "http.disconnect"}])

        async def receive():
            return next(messages)

        async def send(message):  # to no one: the client is gone
            pass

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/gradio_api/upload", "raw_path": b"/gradio_api/upload",
                 "root_path": "", "query_string": b"", "server": ("127.0.0.1", 7860), "client": ("127.0.0.1", 1),
                 "headers": [(b"host", b"127.0.0.1"), (b"content-length", b"2000"),
                             (b"content-type", b"multipart/form-data; boundary=x")]}
        asyncio.run(app(scope, receive, send))  # Gradio's ClientDisconnect ends here, not in uvicorn's error log
        partial = [p for p in gradio_folder.iterdir() if p.is_file()]  # Gradio does not remove it
        assert [p.stat().st_size for p in partial] == [1000]
        files.trim()
        assert partial[0].exists()  # it may still be arriving
        os.utime(partial[0], (time.time() - STALE_TEMP_S - 1,) * 2)
        files.trim()
        assert not partial[0].exists()
    finally:
        engine.close()

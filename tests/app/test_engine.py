"""The job engine in-process: upload checks, timeouts, the results size cap, reconstruct jobs."""

from __future__ import annotations

import gc
import io
import warnings
import weakref

import numpy as np
import pytest
import trimesh
from PIL import Image

from d3s2.app.engine import MAX_SEED, Engine, GenerateParams, Limits, RequestError, mesh_bytes, read_image, read_mesh
from d3s2.geometry.render import encode_png

from ..pipeline.tiny import damaged_exif_images, png_header_only, rgba_image, stored_image_variants, tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture
def engine(pipe, tmp_path):
    eng = Engine(pipe, tmp_path / "out", device="cpu", limits=Limits(max_queue=2, timeout_s=60), band=2 / 64)
    yield eng
    eng.close()
    assert not eng._thread.is_alive()


def test_an_upload_with_damaged_exif_is_one_warning():
    # a JPEG reads its EXIF block as it opens: PIL's complaint then is part of d3s2's one warning, not printed raw
    data, _, expected = damaged_exif_images()["entry count past the block (JPEG)"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(data, Limits())
    assert image.shape == expected.shape
    assert [str(w.message)[:52] for w in caught] == ["damaged EXIF metadata (Corrupt EXIF data. Expecting "]


def test_read_image_modes_and_limits():
    rgba = read_image(encode_png(rgba_image()), Limits())
    assert rgba.shape == (40, 40, 4) and rgba.dtype == np.uint8
    buf = io.BytesIO()
    Image.fromarray(rgba_image()[..., :3]).save(buf, format="JPEG")
    assert read_image(buf.getvalue(), Limits()).shape == (40, 40, 3)
    buf = io.BytesIO()
    pal = Image.fromarray(rgba_image()).convert("P")
    pal.info["transparency"] = 0
    pal.save(buf, format="PNG", transparency=0)
    assert read_image(buf.getvalue(), Limits()).shape[2] == 4  # palette transparency becomes alpha
    buf = io.BytesIO()
    Image.fromarray(rgba_image()).save(buf, format="GIF")
    with pytest.raises(RequestError, match="unsupported image format GIF") as err:
        read_image(buf.getvalue(), Limits())
    assert err.value.status == 415
    with pytest.raises(RequestError, match="pixels") as err:
        read_image(encode_png(rgba_image(40)), Limits(max_pixels=1000))
    assert err.value.status == 413
    with pytest.raises(RequestError, match="upload too large") as err:
        read_image(encode_png(rgba_image(40)), Limits(max_upload_bytes=10))
    assert err.value.status == 413
    truncated = encode_png(rgba_image())[:60]
    with pytest.raises(RequestError) as err:
        read_image(truncated, Limits())
    assert err.value.status == 415


@pytest.mark.parametrize("variant", ["exif rotated", "16-bit gray", "float gray", "tRNS key colour",
                                     "opaque alpha"])
def test_uploads_are_read_as_a_viewer_shows_them(variant):
    data, expected = stored_image_variants()[variant]
    np.testing.assert_array_equal(read_image(data, Limits()), expected)


@pytest.mark.parametrize(("data", "status", "message"), [
    (png_header_only(100_000, 100_000), 413, "image too large (Image size (10000000000 pixels) exceeds limit"),
    (encode_png(rgba_image(8)), 422, "image too small: expected at least 16x16 pixels, got 8x8"),
    (encode_png(rgba_image() * 0), 422, "the image's alpha channel is empty"),
], ids=["decompression bomb", "too small", "empty alpha"])
def test_read_image_refuses_what_no_generation_can_use(data, status, message):
    with pytest.raises(RequestError) as err:
        read_image(data, Limits())
    assert err.value.status == status and err.value.message.startswith(message)


def test_read_mesh():
    box = trimesh.creation.box()
    mesh = read_mesh(box.export(file_type="glb"), ".GLB", Limits())
    assert len(mesh.faces) == 12
    with pytest.raises(RequestError, match="mesh too large: 12 faces") as err:
        read_mesh(box.export(file_type="glb"), ".glb", Limits(max_mesh_faces=10))
    assert err.value.status == 413
    with pytest.raises(RequestError, match="unsupported mesh file type .exe") as err:
        read_mesh(b"MZ", ".exe", Limits())
    assert err.value.status == 415
    with pytest.raises(RequestError, match="cannot read the mesh"):
        read_mesh(b"definitely not a glb", ".glb", Limits())
    with pytest.raises(RequestError, match="empty upload"):
        read_mesh(b"", ".obj", Limits())


def test_timeout_stops_a_running_job(engine):
    engine.limits.timeout_s = 0.5
    job = engine.submit_generate(rgba_image(), GenerateParams(resolution=128, steps=100))
    assert job.finished.wait(60)
    assert job.status == "timeout" and job.error == "timed out after 0.5 s"
    assert not job.folder.exists()
    # A job that waited past its deadline never starts.
    engine.limits.timeout_s = 0.0
    late = engine.submit_generate(rgba_image(), GenerateParams(resolution=64, steps=1))
    assert late.finished.wait(30) and late.status == "timeout" and "in the queue" in late.error


def test_a_finished_job_keeps_no_reference_to_its_upload(engine):
    uploads = [rgba_image(), rgba_image() * 0]  # the second fails in the job (no object)
    kept = [weakref.ref(u) for u in uploads]
    done = engine.submit_generate(uploads[0], GenerateParams(resolution=64, steps=1))
    failed = engine.submit_generate(uploads[1], GenerateParams(resolution=64, steps=1))
    assert done.finished.wait(60) and done.status == "done", done.error
    assert failed.finished.wait(60) and failed.status == "failed"
    del uploads
    gc.collect()
    assert [ref() for ref in kept] == [None, None]  # the job records stay, the decoded images do not
    assert engine.get(done.id) is done and engine.get(failed.id) is failed


def test_an_empty_mesh_fails_the_job(engine, monkeypatch):
    monkeypatch.setattr(engine.pipeline, "_post", lambda mesh, faces, device: trimesh.Trimesh())
    job = engine.submit_generate(rgba_image(), GenerateParams(resolution=64, steps=1))
    assert job.finished.wait(60)
    assert job.status == "failed" and job.error.startswith("the generated mesh is empty")
    assert not job.folder.exists() and job.file("mesh.glb") is None


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 2**70])
def test_seed_out_of_range_is_refused_before_queueing(engine, seed):
    with pytest.raises(RequestError, match=f"expected seed in \\[0, {MAX_SEED}\\], got {seed}") as err:
        engine.submit_generate(rgba_image(), GenerateParams(seed=seed))
    assert err.value.status == 422 and engine.queue_state()["waiting"] == 0


@pytest.mark.parametrize("cfg", [float("nan"), float("inf"), -float("inf"), -0.5, 50.5])
def test_cfg_that_is_no_finite_number_in_range_is_refused_before_queueing(engine, cfg):
    # nan fails every comparison: the message must not blame the range alone
    with pytest.raises(RequestError) as err:
        engine.submit_generate(rgba_image(), GenerateParams(cfg=cfg))
    assert err.value.status == 422
    assert err.value.message == f"expected cfg to be a finite number in [0, 50], got {cfg}"
    assert engine.queue_state()["waiting"] == 0

def test_a_restart_forgets_earlier_jobs_and_removes_their_files(pipe, tmp_path):
    first = Engine(pipe, tmp_path / "out", device="cpu")
    job = first.submit_generate(rgba_image(), GenerateParams(resolution=64, steps=1))
    assert job.finished.wait(60) and job.status == "done", job.error
    first.close()
    (tmp_path / "out" / "jobs" / "notes").mkdir()  # not a job folder: left alone
    second = Engine(pipe, tmp_path / "out", device="cpu")
    try:
        assert not job.folder.exists() and (tmp_path / "out" / "jobs" / "notes").is_dir()
        with pytest.raises(RequestError, match="unknown job id") as err:
            second.get(job.id)
        assert err.value.status == 404
    finally:
        second.close()


def test_results_size_cap(engine):
    first = engine.submit_generate(rgba_image(), GenerateParams(resolution=64, steps=1))
    assert first.finished.wait(60) and first.status == "done", first.error
    size = sum(f.stat().st_size for f in first.folder.iterdir())
    engine.limits.results_cap_bytes = size + size // 2  # room for one result only
    second = engine.submit_generate(rgba_image(), GenerateParams(resolution=64, steps=1))
    assert second.finished.wait(60) and second.status == "done"
    assert first.expired and not first.folder.exists() and first.file("mesh.glb") is None
    assert not second.expired and second.file("mesh.glb") is not None
    assert [p.name for p in engine.jobs_dir.iterdir()] == [second.id]


def _two_results(engine):
    jobs = [engine.submit_generate(rgba_image(), GenerateParams(resolution=64, steps=1)) for _ in range(2)]
    for job in jobs:
        assert job.finished.wait(60) and job.status == "done", job.error
    return jobs


def _folder_bytes(engine):
    return sum(f.stat().st_size for f in engine.jobs_dir.rglob("*") if f.is_file())


def test_the_results_cap_counts_the_downloads_and_keeps_their_job(engine):
    first, second = _two_results(engine)
    glb = second.file("mesh.glb")
    downloads = sum(len(mesh_bytes(glb, fmt)) for fmt in ("obj", "ply"))
    # Both results fit, not with the downloads of one too.
    engine.limits.results_cap_bytes = glb.stat().st_size + downloads + glb.stat().st_size // 2
    paths = engine.write_downloads(second)
    assert [p.name for p in paths] == ["mesh.glb", "mesh.obj", "mesh.ply"] and all(p.is_file() for p in paths)
    assert first.expired and not first.folder.exists()
    assert _folder_bytes(engine) <= engine.limits.results_cap_bytes
    with pytest.raises(FileNotFoundError, match="removed by the results size cap"):
        engine.write_downloads(first)
    assert not first.folder.exists()
    # The job whose downloads were written stays even when it alone is over the cap.
    engine.limits.results_cap_bytes = 1
    assert all(p.is_file() for p in engine.write_downloads(second))


def test_downloads_of_a_result_the_cap_removes_meanwhile_are_not_written(engine, monkeypatch):
    from d3s2.app import engine as engine_mod

    first, second = _two_results(engine)
    convert = engine_mod.mesh_bytes

    def convert_while_a_later_job_ends(path, fmt):
        engine.limits.results_cap_bytes = 1
        engine._enforce_cap(keep=second)  # what the worker does when a later job finishes
        return convert(path, fmt) if path.exists() else b"read before the cap"

    monkeypatch.setattr(engine_mod, "mesh_bytes", convert_while_a_later_job_ends)
    with pytest.raises(FileNotFoundError, match="removed by the results size cap"):
        engine.write_downloads(first)
    assert first.expired and not first.folder.exists()  # no folder made again for its downloads


def test_reconstruct_job(engine):
    sphere = trimesh.creation.icosphere(subdivisions=2)
    job = engine.submit_reconstruct(sphere, 64)
    assert job.finished.wait(60), "reconstruct did not finish"
    assert job.status == "done", job.error
    assert job.result["input_faces"] == len(sphere.faces) and job.result["resolution"] == 64
    out = trimesh.load(job.file("mesh.glb"), force="mesh")
    assert len(out.faces) == job.result["faces"] > 0
    assert len(trimesh.load(job.file("input.glb"), force="mesh").faces) == len(sphere.faces)
    with pytest.raises(RequestError, match="expected resolution in \\[64, 128\\], got 96"):
        engine.submit_reconstruct(sphere, 96)


def test_close_cancels_waiting_jobs(pipe, tmp_path):
    eng = Engine(pipe, tmp_path / "out", device="cpu", limits=Limits(max_queue=2))
    running = eng.submit_generate(rgba_image(), GenerateParams(resolution=128, steps=100))
    waiting = eng.submit_generate(rgba_image(), GenerateParams(resolution=64, steps=1))
    eng.close()
    assert running.status == "cancelled" and waiting.status == "cancelled"
    with pytest.raises(RequestError, match="shutting down") as err:
        eng.submit_generate(rgba_image(), GenerateParams())
    assert err.value.status == 503

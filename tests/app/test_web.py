"""The web app's preview of the conditioner input, for shared and per-DiT image encoders."""

from __future__ import annotations

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



def test_results_are_served_from_their_job_folder_not_copied_into_gradios_cache(tmp_path, monkeypatch):
    # A copy in Gradio's cache would escape the results cap, and outlive the removal of its job's files.
    import asyncio

    from d3s2.app.engine import Engine
    from d3s2.app.web import build_app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # read by each Gradio block as it is built
    monkeypatch.setattr("gradio.data_classes._StaticFiles.all_paths", [])  # process-wide: restored after
    engine = Engine(tiny_pipeline(), tmp_path / "out", band=2 / 64)
    try:
        app = build_app(engine)
        generate = next(f for f in app.fns.values() if f.name == "generate")
        viewer, files, summary = generate.fn(_png(tmp_path), 64, 0, 1, 0, 0)
        # What Gradio does with an event's return value before the page gets it (copies files, makes URLs).
        shown = asyncio.run(app.postprocess_data(generate, [viewer, files, summary], None))
        shown_paths = [Path(shown[0]["path"]), *(Path(f["path"]) for f in shown[1])]
        assert shown_paths == [Path(viewer), *map(Path, files)]
        assert all(p.parent.parent == engine.jobs_dir for p in shown_paths)
        assert not list((tmp_path / "gradio").rglob("mesh.*"))
    finally:
        engine.close()

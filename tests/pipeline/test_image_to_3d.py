import dataclasses
import json
import re

import numpy as np
import pytest
import torch
import trimesh

from d3s2.pipeline.image_to_3d import PIPELINE_FILE, ImageTo3DPipeline, PipelineSettings, read_resolutions

from .tiny import rgba_image, tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    return pipe.save_pretrained(tmp_path_factory.mktemp("weights") / "tiny")


def _check_mesh(mesh: trimesh.Trimesh) -> None:
    assert isinstance(mesh, trimesh.Trimesh)
    assert len(mesh.faces) > 0
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert np.abs(mesh.vertices).max() <= 1.0
    assert mesh.volume > 0  # outward normals: inside/outside right


def test_round_trip(pipe, saved):
    assert sorted(p.name for p in saved.iterdir()) == sorted([PIPELINE_FILE, *pipe.components()])
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    loaded = ImageTo3DPipeline.from_pretrained(saved)
    assert loaded.resolutions == [64, 128]
    assert loaded.settings == pipe.settings
    for name, module in pipe.components().items():
        a, b = module.state_dict(), loaded.components()[name].state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    only_64 = ImageTo3DPipeline.from_pretrained(saved, resolutions=[64])
    assert only_64.resolutions == [64]
    pipe.save_pretrained(saved)  # replacing an existing folder works
    assert (saved / PIPELINE_FILE).is_file()


def test_end_to_end_512_like(pipe):
    mesh = pipe(rgba_image(), resolution=64, seed=0, progress=False, device="cpu")
    _check_mesh(mesh)
    assert pipe.last_timing.tokens[64] > 0
    assert set(pipe.last_timing.seconds) >= {"prepare", "condition", "dense", "sparse 64", "post", "total"}
    again = pipe(rgba_image(), resolution=64, seed=0, progress=False, device="cpu")
    assert np.array_equal(mesh.vertices, again.vertices) and np.array_equal(mesh.faces, again.faces)
    other = pipe(rgba_image(), resolution=64, seed=1, progress=False, device="cpu")
    assert len(other.vertices) != len(mesh.vertices) or not np.array_equal(other.vertices, mesh.vertices)


def test_cascade(pipe):
    old = pipe.settings
    # Fewer structure voxels and a one-voxel index band keep the 128³ stage at ~100 tokens on the CPU.
    pipe.settings = dataclasses.replace(old, occupancy_threshold=0.76, index_band_voxels=1.0)
    try:
        mesh = pipe(rgba_image(), resolution=128, seed=0, steps=1, progress=False, device="cpu")
    finally:
        pipe.settings = old
    _check_mesh(mesh)
    tokens = pipe.last_timing.tokens
    assert 0 < tokens[64] < tokens[128]  # the index comes from the 64³ mesh's band at 128³


def test_loaded_pipeline_matches(pipe, saved):
    loaded = ImageTo3DPipeline.from_pretrained(saved)
    a = pipe(rgba_image(), resolution=64, seed=3, progress=False, device="cpu")
    b = loaded(rgba_image(), resolution=64, seed=3, progress=False, device="cpu")
    assert np.array_equal(a.vertices, b.vertices)


def test_errors(pipe, tmp_path):
    empty = np.zeros((32, 32, 4), np.uint8)
    with pytest.raises(ValueError, match="alpha channel is empty"):
        pipe(empty, resolution=64, progress=False, device="cpu")
    with pytest.raises(ValueError, match="expected resolution in \\[64, 128\\], got 512"):
        pipe(rgba_image(), resolution=512, progress=False, device="cpu")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        pipe(bad, resolution=64, progress=False, device="cpu")
    with pytest.raises(FileNotFoundError, match="weights folder not found"):
        ImageTo3DPipeline.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="pipeline.json"):
        ImageTo3DPipeline.from_pretrained(tmp_path)


def test_empty_structure_is_a_clear_error(pipe):
    old = pipe.settings.occupancy_threshold
    pipe.settings.occupancy_threshold = 0.99  # random weights: sigmoid(logit) stays near 0.5 (see tiny.py)
    try:
        with pytest.raises(RuntimeError, match="empty structure"):
            pipe(rgba_image(), resolution=64, progress=False, device="cpu")
    finally:
        pipe.settings.occupancy_threshold = old


def test_missing_conditioner(pipe, saved, tmp_path):
    import shutil

    copy = tmp_path / "noenc"
    shutil.copytree(saved, copy)
    shutil.rmtree(copy / "conditioner")
    manifest = json.loads((copy / PIPELINE_FILE).read_text())
    manifest["components"].remove("conditioner")
    (copy / PIPELINE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="no conditioner"):
        ImageTo3DPipeline.from_pretrained(copy)
    loaded = ImageTo3DPipeline.from_pretrained(copy, conditioner=saved / "conditioner")
    assert loaded.conditioner.image_size == pipe.conditioner.image_size


def test_what_is_missing_is_named_before_any_weights_load(saved, tmp_path, monkeypatch):
    import shutil

    from d3s2.models import registry

    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before the missing part was named")

    monkeypatch.setattr(registry, "from_pretrained", no_loading)
    noenc = tmp_path / "noenc"
    shutil.copytree(saved, noenc)
    manifest = json.loads((noenc / PIPELINE_FILE).read_text())
    manifest["components"].remove("conditioner")
    (noenc / PIPELINE_FILE).write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="holds no conditioner"):
        ImageTo3DPipeline.from_pretrained(noenc)
    with pytest.raises(FileNotFoundError, match="conditioner weights not found"):
        ImageTo3DPipeline.from_pretrained(noenc, conditioner=tmp_path / "dinov2.pth")
    shutil.rmtree(noenc / "sparse_vae_128")
    with pytest.raises(FileNotFoundError, match="lists component 'sparse_vae_128' but .* is missing"):
        ImageTo3DPipeline.from_pretrained(noenc, conditioner=saved / "conditioner")


def test_components_of_the_wrong_kind_are_named_at_load_time(saved, tmp_path):
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(saved, mixed)
    (mixed / "dense_dit").rename(tmp_path / "dense_dit")
    (mixed / "dense_vae").rename(mixed / "dense_dit")
    (tmp_path / "dense_dit").rename(mixed / "dense_vae")
    with pytest.raises(ValueError, match="dense_dit: expected DenseDiT, got DenseShapeVAE; dense_vae: expected "
                                         "DenseShapeVAE, got DenseDiT"):
        ImageTo3DPipeline.from_pretrained(mixed)
    # Another model as the image encoder (--conditioner a registry folder of a VAE).
    with pytest.raises(ValueError, match="conditioner: expected ImageEncoder, got DenseShapeVAE"):
        ImageTo3DPipeline.from_pretrained(saved, conditioner=saved / "dense_vae")


def test_settings_from_published_defaults():
    d = {"dense": {"steps": 50, "guidance_scale": 7.0, "shift": 6.0, "num_train_timesteps": 1000},
         "sparse_512": {"steps": 30, "guidance_scale": 7.0, "shift": 6.0, "num_train_timesteps": 1000},
         "sparse_1024": {"steps": 15, "guidance_scale": 7.0, "shift": 8.0, "num_train_timesteps": 1000},
         "occupancy_threshold": 0.1, "mc_threshold": 0.2, "index_udf_voxels": 4.0, "sparse_1024_decode_chunk": 32}
    s = PipelineSettings.from_published(d)
    assert s.stage(1024).steps == 15 and s.stage(1024).shift == 8.0 and s.stage(512).steps == 30
    assert s.chunk(1024) == 32 and s.chunk(512) == 0 and s.mc_level == 0.2
    assert s.refine and s.refine_level == 0.4  # published folders apply their refiners
    from d3s2.pipeline.published import PublishedDefaults

    # read_defaults → from_published keeps the 1024 decode chunk (32 latent voxels = the published 4 per axis)
    assert PipelineSettings.from_published(PublishedDefaults(version="v1.1")).chunk(1024) == 32
    assert PipelineSettings.from_dict(s.to_dict()) == s


def test_structure_override(pipe):
    coords = torch.tensor([[3, 3, 3], [3, 3, 4], [4, 3, 3]], dtype=torch.int32)
    mesh = pipe(rgba_image(), resolution=64, seed=0, steps=1, progress=False, device="cpu", structure={64: coords})
    assert pipe.last_timing.tokens[64] == 3 and pipe.last_timing.voxels[64] == 3 * 512
    _check_mesh(mesh)
    with pytest.raises(ValueError, match="structure\\[64\\]"):
        pipe(rgba_image(), resolution=64, progress=False, device="cpu", structure={64: torch.zeros(0, 3)})


def test_on_stage_reports_and_can_stop(pipe):
    seen = []
    pipe(rgba_image(), resolution=64, steps=1, progress=False, device="cpu",
         on_stage=lambda name, i, n: seen.append((name, i, n)))
    assert seen == [("prepare", 0, 5), ("condition", 1, 5), ("dense", 2, 5), ("sparse 64", 3, 5), ("post", 4, 5)]

    def stop(name, i, n):
        if name == "dense":
            raise TimeoutError("stop here")

    with pytest.raises(TimeoutError, match="stop here"):
        pipe(rgba_image(), resolution=64, steps=1, progress=False, device="cpu", on_stage=stop)


def test_unusable_values_are_clear_errors(pipe):
    with pytest.raises(ValueError, match="expected steps ≥ 1 .*, got 0"):
        pipe(rgba_image(), resolution=64, steps=0, progress=False, device="cpu")
    for cfg in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="expected a finite cfg"):
            pipe(rgba_image(), resolution=64, cfg=cfg, progress=False, device="cpu")
    for seed in (-1, 2**63, 2**64):  # torch.Generator takes seeds below 2**64, and each stage adds its index
        with pytest.raises(ValueError, match=re.escape(f"expected seed in [0, {2**63 - 1}], got {seed}")):
            pipe(rgba_image(), resolution=64, seed=seed, progress=False, device="cpu")
    with pytest.raises(ValueError, match=r"expected occupancy_threshold in \[0, 1\)"):
        PipelineSettings(occupancy_threshold=-1.0)
    old = pipe.settings.occupancy_threshold
    pipe.settings.occupancy_threshold = 2.0  # assigned after construction: the call checks it
    try:
        with pytest.raises(ValueError, match=r"expected occupancy_threshold in \[0, 1\) .*, got 2.0"):
            pipe(rgba_image(), resolution=64, progress=False, device="cpu")
    finally:
        pipe.settings.occupancy_threshold = old


def test_steps_and_cfg_reach_every_sampler_as_given(pipe, monkeypatch):
    import d3s2.flow.sampler

    seen = []
    real = d3s2.flow.sampler.sample_euler

    def recording(*args, **kwargs):
        seen.append((kwargs["steps"], kwargs["guidance_scale"], kwargs["uncond"] is not None))
        return real(*args, **kwargs)

    monkeypatch.setattr(d3s2.flow.sampler, "sample_euler", recording)
    pipe(rgba_image(), resolution=64, steps=1, cfg=0.0, progress=False, device="cpu")
    assert seen == [(1, 0.0, True)] * 2  # cfg 0 is a guidance scale (the unconditional output), not "default"
    seen.clear()
    pipe(rgba_image(), resolution=64, progress=False, device="cpu")
    assert seen == [(2, 3.0, True)] * 2  # None: each stage's settings (tiny.py)


def test_resolutions_are_checked_before_loading(saved):
    assert read_resolutions(saved) == [64, 128]
    with pytest.raises(ValueError, match=r"expected resolutions among \[64, 128\] for .*, got \[100\]"):
        ImageTo3DPipeline.from_pretrained(saved, resolutions=[100])


def test_progress_bars_can_be_hidden_and_close_on_errors(pipe, saved, capsys):
    from tqdm import tqdm

    ImageTo3DPipeline.from_pretrained(saved, progress=False)
    assert capsys.readouterr().err == ""
    ImageTo3DPipeline.from_pretrained(saved)
    assert "loading" in capsys.readouterr().err

    def open_bars(desc):
        return [b for b in list(tqdm._instances) if b.desc == desc]

    # The traceback keeps the call's frame, and so its bar, alive: only close() removes it.
    with pytest.raises(ValueError, match="alpha channel is empty") as failed_call:
        pipe(np.zeros((32, 32, 4), np.uint8), resolution=64, device="cpu")
    assert failed_call.traceback and open_bars("generate") == []


def test_importable_from_the_package_without_loading_torch():
    import subprocess
    import sys

    import d3s2.pipeline
    from d3s2.pipeline import image_to_3d

    assert d3s2.pipeline.ImageTo3DPipeline is image_to_3d.ImageTo3DPipeline
    assert d3s2.pipeline.PipelineSettings is image_to_3d.PipelineSettings
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        d3s2.pipeline.Nope  # noqa: B018
    code = "import sys, d3s2.pipeline; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"

"""`d3s2 demo` with a bundled demo pipeline (a tiny random one at 64³ stands in): image → watertight GLB, and a
rendered bundled example scored against its mesh."""

import json

import pytest
import trimesh
from PIL import Image

import d3s2.pipeline
from d3s2.cli import main
from d3s2.pipeline.image_to_3d import ImageTo3DPipeline

from .tiny import png_header_only, rgba_image, tiny_pipeline


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    p = tiny_pipeline()
    # The 64³ stage only: the demo runs the pipeline's highest resolution, and 128³ is slow on a shared CPU.
    p64 = ImageTo3DPipeline(p.conditioner, p.dense_dit, p.dense_vae, {64: p.sparse_dits[64]},
                            {64: p.sparse_vaes[64]}, p.settings)
    return p64.save_pretrained(tmp_path_factory.mktemp("demo") / "demo_pipeline")


@pytest.fixture
def demo_weights(tiny_weights, monkeypatch):
    monkeypatch.setattr(d3s2.pipeline, "demo_weights_dir", lambda: tiny_weights)
    return tiny_weights


def test_demo_with_weights_generates_from_an_image(demo_weights, tmp_path, capsys):
    image = tmp_path / "thing.png"
    Image.fromarray(rgba_image()).save(image)
    out = tmp_path / "out"
    assert main(["demo", "--image", str(image), "--out", str(out), "--steps", "1"]) == 0
    report = json.loads((out / "thing_report.json").read_text())
    assert report["watertight"] and report["faces"] > 0 and report["weights"] == str(demo_weights)
    mesh = trimesh.load(out / "thing.glb", force="mesh", process=True)
    assert len(mesh.faces) > 0 and mesh.is_watertight
    assert "metrics" not in report  # no camera for a user image
    captured = capsys.readouterr()
    assert "watertight=True" in captured.out
    assert "\r" not in captured.err  # pytest's stderr is no terminal: no loading or sampling bar frames


def test_demo_with_weights_scores_a_rendered_example(demo_weights, tmp_path, capsys):
    assert main(["demo", "--example", "horse_lusitano", "--out", str(tmp_path), "--steps", "1"]) == 0
    report = json.loads((tmp_path / "horse_lusitano_report.json").read_text())
    m = report["metrics"]
    assert 0.0 <= m["silhouette_iou"] <= 1.0 and m["chamfer_l1"] > 0 and 0.0 <= m["fscore@0.01"] <= 1.0
    for key in ("input", "outputs"):
        assert report[key]
    with Image.open(tmp_path / "horse_lusitano_input.png") as im:
        assert im.mode == "RGBA" and im.size == (518, 518)
    assert (tmp_path / "horse_lusitano_compare.png").stat().st_size > 0
    assert "silhouette IoU" in capsys.readouterr().out


def _write_inputs(folder):
    folder.mkdir()
    (folder / "text.png").write_text("not an image")
    (folder / "huge.png").write_bytes(png_header_only(100_000, 100_000))
    Image.fromarray(rgba_image() * 0).save(folder / "transparent.png")


@pytest.mark.parametrize(("args", "message"), [
    (["--image", "{inputs}/missing.png"], "image not found"),
    (["--image", "{inputs}/text.png"], "cannot read image"),
    (["--image", "{inputs}/huge.png"], "is too large"),
    (["--image", "{inputs}/transparent.png"], "alpha channel is empty"),
    (["--mesh", "{inputs}/missing.obj"], "missing.obj: no such file"),
    (["--steps", "0"], "expected --steps ≥ 1, got 0"),
    (["--seed", "-1"], "expected --seed in [0, 9223372036854775807], got -1"),
])
def test_demo_checks_its_input_before_loading_and_writing(demo_weights, tmp_path, capsys, monkeypatch, args,
                                                          message):
    inputs = tmp_path / "inputs"
    _write_inputs(inputs)

    def refuse(*a, **kw):
        raise AssertionError("the models were loaded before the input was checked")

    monkeypatch.setattr(ImageTo3DPipeline, "from_pretrained", refuse)
    out = tmp_path / "d1"
    assert main(["demo", *[a.format(inputs=inputs) for a in args], "--out", str(out)]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()  # no empty output folder left behind


def test_demo_refuses_an_out_that_is_a_file_before_loading(demo_weights, tmp_path, capsys, monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("the models were loaded before --out was checked")

    monkeypatch.setattr(ImageTo3DPipeline, "from_pretrained", refuse)
    out = tmp_path / "report.txt"
    out.write_text("an operator's file")
    assert main(["demo", "--out", str(out)]) == 1
    assert f"expected --out to be a folder, got the file {out}" in capsys.readouterr().err
    assert out.read_text() == "an operator's file"


def test_an_empty_generation_is_an_error_and_writes_nothing(demo_weights, tmp_path, capsys, monkeypatch):
    # As `d3s2 generate`: no 0-face GLB presented as the demo's result.
    monkeypatch.setattr(ImageTo3DPipeline, "__call__", lambda self, *a, **kw: trimesh.Trimesh())
    image = tmp_path / "thing.png"
    Image.fromarray(rgba_image()).save(image)
    out = tmp_path / "out"
    assert main(["demo", "--image", str(image), "--out", str(out), "--steps", "1"]) == 1
    assert "the generated mesh is empty" in capsys.readouterr().err
    assert not out.exists()

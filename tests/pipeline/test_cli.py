import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from d3s2.cli import build_parser, main
from d3s2.pipeline import cli as generate_cli
from d3s2.pipeline.image_to_3d import ImageTo3DPipeline

from .tiny import png_header_only, rgba_image, tiny_pipeline


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_pipeline().save_pretrained(tmp_path_factory.mktemp("cli") / "weights")


def test_generate_dir_and_file(weights, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(rgba_image()).save(inputs / "a.png")
    Image.fromarray(rgba_image(48)).save(inputs / "b.png")
    (inputs / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    rc = main(["generate", str(inputs), "-o", str(out), "--weights", str(weights), "--resolution", "64",
               "--device", "cpu", "--format", "obj", "--no-progress"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.obj", "b.obj"]
    mesh = trimesh.load(out / "a.obj", force="mesh", process=True)
    assert len(mesh.faces) > 0 and mesh.is_watertight
    single = tmp_path / "single.glb"
    assert main(["generate", str(inputs / "a.png"), "-o", str(single), "--weights", str(weights),
                 "--resolution", "64", "--device", "cpu", "--seed", "2", "--no-progress"]) == 0
    assert single.is_file() and "watertight True" in capsys.readouterr().out


def test_generate_errors(weights, tmp_path, capsys, monkeypatch):
    good = tmp_path / "good.png"
    Image.fromarray(rgba_image()).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    monkeypatch.delenv("D3S2_WEIGHTS", raising=False)
    assert main(["generate", str(good), "-o", str(tmp_path / "o"), "--weights", str(tmp_path / "missing")]) == 1
    assert "weights folder not found" in capsys.readouterr().err
    out = tmp_path / "o"
    rc = main(["generate", str(bad), str(good), "-o", str(out), "--weights", str(weights), "--resolution", "64",
               "--device", "cpu", "--no-progress"])
    assert rc == 1
    assert "cannot read image" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["good.glb"]  # the bad image does not stop the good one
    assert main(["generate", str(good), "-o", str(out), "--weights", str(weights), "--resolution", "512",
                 "--device", "cpu"]) == 1
    assert "expected --resolution in [64, 128]" in capsys.readouterr().err
    np.testing.assert_equal(len(list(out.iterdir())), 1)


def test_generate_defaults_to_the_bundled_demo_pipeline(weights, tmp_path, capsys, monkeypatch):
    import d3s2.pipeline

    good = tmp_path / "good.png"
    Image.fromarray(rgba_image()).save(good)
    monkeypatch.delenv("D3S2_WEIGHTS", raising=False)
    monkeypatch.setattr(d3s2.pipeline, "demo_weights_dir", lambda: tmp_path / "absent")
    assert main(["generate", str(good), "-o", str(tmp_path / "a.glb"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "bundled demo pipeline is missing" in err and "--weights" in err
    monkeypatch.setattr(d3s2.pipeline, "demo_weights_dir", lambda: weights)
    assert d3s2.pipeline.demo_weights() == weights
    assert main(["generate", str(good), "-o", str(tmp_path / "b.glb"), "--device", "cpu", "--resolution", "64",
                 "--steps", "1", "--no-progress"]) == 0
    assert (tmp_path / "b.glb").is_file() and "watertight True" in capsys.readouterr().out


def _fast(weights) -> list[str]:
    return ["--weights", str(weights), "--resolution", "64", "--device", "cpu", "--steps", "1", "--no-progress"]


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if the command gets as far as loading the weights."""
    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the error")

    monkeypatch.setattr(ImageTo3DPipeline, "from_pretrained", refuse)


@pytest.mark.parametrize(("extra", "message"), [
    (["--steps", "0"], "expected --steps ≥ 1, got 0"),
    (["--cfg", "nan"], "expected a finite --cfg, got nan"),
    (["--cfg", "inf"], "expected a finite --cfg, got inf"),
    (["--occupancy-threshold", "-1"], "expected --occupancy-threshold in (0, 1), got -1.0"),
    (["--occupancy-threshold", "2"], "expected --occupancy-threshold in (0, 1), got 2.0"),
    (["--faces", "0"], "expected --faces ≥ 1, got 0"),
    (["--resolution", "100"], "expected --resolution in [64, 128] for {weights}, got 100"),
    (["-o", "{tmp}/x.glb", "--format", "obj"], "names a .glb file but --format is obj"),
    (["-o", "{tmp}/o2/out.txt"], "expected -o to end in .glb/.obj/.ply/.stl or to be a directory"),
    (["-o", "{tmp}/good.png/out.glb"], "good.png is a file, expected a directory"),
    (["-o", "{tmp}/existing.glb"], "existing.glb is a directory, expected a mesh file name"),
])
def test_generate_rejects_unusable_arguments_before_loading(weights, tmp_path, capsys, no_loading, extra, message):
    good = tmp_path / "good.png"
    Image.fromarray(rgba_image()).save(good)
    (tmp_path / "existing.glb").mkdir()
    extra = [a.format(tmp=tmp_path) for a in extra]
    out = [] if "-o" in extra else ["-o", str(tmp_path / "out")]
    args = ["generate", str(good), *out, "--weights", str(weights), "--device", "cpu", "--no-progress", *extra]
    assert main(args) == 1
    assert message.format(weights=weights) in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o2").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_generate_cuda_device_without_cuda_is_a_clear_error(weights, tmp_path, capsys, no_loading):
    good = tmp_path / "good.png"
    Image.fromarray(rgba_image()).save(good)
    assert main(["generate", str(good), "-o", str(tmp_path / "a.glb"), "--weights", str(weights),
                 "--device", "cuda"]) == 1
    assert "CUDA is not available on this machine" in capsys.readouterr().err
    assert main(["eval", "generate", "--data", str(tmp_path), "--out", str(tmp_path / "eval"),
                 "--weights", str(weights), "--device", "cuda"]) == 1
    assert "CUDA is not available on this machine" in capsys.readouterr().err


def test_generate_writes_every_export_format(weights, tmp_path):
    from d3s2.geometry.export import EXPORT_FORMATS

    assert generate_cli.FORMATS == EXPORT_FORMATS
    good = tmp_path / "good.png"
    Image.fromarray(rgba_image()).save(good)
    assert main(["generate", str(good), "-o", str(tmp_path / "o2" / "out.stl"), *_fast(weights)]) == 0
    assert (tmp_path / "o2" / "out.stl").is_file()  # a file, not a folder named out.stl
    assert trimesh.load(tmp_path / "o2" / "out.stl", force="mesh").is_watertight
    # A trailing / names a directory, whatever its suffix; --format picks the files' format there.
    assert main(["generate", str(good), "-o", str(tmp_path / "meshes.v2") + "/", "--format", "ply",
                 *_fast(weights)]) == 0
    assert [p.name for p in (tmp_path / "meshes.v2").iterdir()] == ["good.ply"]


def test_batch_goes_on_after_user_data_errors(weights, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a_huge.png").write_bytes(png_header_only(100_000, 100_000))
    Image.fromarray(rgba_image(1)).save(inputs / "b_dot.png")
    Image.fromarray(rgba_image()).save(inputs / "c_good.png")
    out = tmp_path / "out"
    assert main(["generate", str(inputs), "-o", str(out), *_fast(weights)]) == 1
    err = capsys.readouterr().err
    assert "a_huge.png is too large: expected at most" in err and "MAX_IMAGE_PIXELS" in err
    assert "b_dot.png: expected at least 16x16 pixels, got 1x1" in err
    assert [p.name for p in out.iterdir()] == ["c_good.glb"]


def test_batch_goes_on_after_a_failed_write_but_not_after_a_bug(weights, tmp_path, capsys, monkeypatch):
    import d3s2.geometry.export

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b"):
        Image.fromarray(rgba_image()).save(inputs / f"{name}.png")
    real_export = d3s2.geometry.export.export_mesh

    def disk_full_for_a(mesh, path):
        if path.name == "a.glb":
            raise OSError(28, "No space left on device")
        return real_export(mesh, path)

    monkeypatch.setattr(d3s2.geometry.export, "export_mesh", disk_full_for_a)
    out = tmp_path / "out"
    assert main(["generate", str(inputs), "-o", str(out), *_fast(weights)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["b.glb"]

    def bug(mesh, path):
        raise KeyError("a bug, not bad data")

    monkeypatch.setattr(d3s2.geometry.export, "export_mesh", bug)
    with pytest.raises(KeyError, match="a bug"):
        main(["generate", str(inputs), "-o", str(out), *_fast(weights)])


def test_faces_warns_when_decimation_breaks_watertightness(weights, tmp_path, capsys, monkeypatch):
    import d3s2.geometry.export

    def open_decimation(mesh, num_faces):
        return trimesh.Trimesh(mesh.vertices, mesh.faces[1:num_faces], process=False)  # one face short: a hole

    monkeypatch.setattr(d3s2.geometry.export, "decimate", open_decimation)
    good = tmp_path / "good.png"
    Image.fromarray(rgba_image()).save(good)
    assert main(["generate", str(good), "-o", str(tmp_path / "a.glb"), "--faces", "50", *_fast(weights)]) == 0
    captured = capsys.readouterr()
    assert "watertight False" in captured.out
    assert "warning" in captured.err and "decimating to about 50 faces broke watertightness" in captured.err


def test_no_progress_hides_every_bar(weights, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(rgba_image()).save(good)
    assert main(["generate", str(good), "-o", str(tmp_path / "a.glb"), *_fast(weights)]) == 0
    assert capsys.readouterr().err == ""  # no "loading" bar either


def _subcommand(parser, *names):
    for name in names:
        parser = next(a for a in parser._actions if a.choices and name in a.choices).choices[name]
    return parser


@pytest.mark.parametrize("command", [("generate",), ("eval", "generate"), ("demo",)])
def test_every_option_has_help(command):
    parser = _subcommand(build_parser(), *command)
    missing = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert missing == []


def test_generate_help_documents_limits():
    text = _subcommand(build_parser(), "generate").format_help()
    assert "one of the pipeline's resolutions" in text and "512 or 1024" not in text
    assert "may break watertightness" in text and ".stl" in text


def test_an_error_is_not_followed_by_a_stale_progress_bar(weights, tmp_path, capsys):
    empty = tmp_path / "empty.png"
    Image.fromarray(rgba_image() * 0).save(empty)  # no object: fails in the "prepare" stage
    assert main(["generate", str(empty), "-o", str(tmp_path / "a.glb"), "--weights", str(weights),
                 "--resolution", "64", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "generate:" in err  # the bar was shown
    assert "alpha channel is empty" in err.splitlines()[-1]


@pytest.mark.parametrize(("extra", "message"), [
    (["--steps", "0"], "expected --steps ≥ 1, got 0"),
    (["--cfg", "nan"], "expected a finite --cfg, got nan"),
    (["--occupancy-threshold", "1"], "expected --occupancy-threshold in (0, 1), got 1.0"),
    (["--resolution", "100"], "expected --resolution in [64, 128] for {weights}, got 100"),
])
def test_eval_generate_rejects_unusable_arguments_before_loading(weights, tmp_path, capsys, no_loading, extra,
                                                                 message):
    assert main(["eval", "generate", "--data", str(tmp_path), "--out", str(tmp_path / "eval"), "--weights",
                 str(weights), "--device", "cpu", *extra]) == 1
    assert message.format(weights=weights) in capsys.readouterr().err

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from d3s2.cli import build_parser, main
from d3s2.pipeline import cli as generate_cli
from d3s2.pipeline.image_to_3d import ImageTo3DPipeline

from .tiny import damaged_exif_images, png_header_only, rgba_image, tiny_pipeline


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
    (["--cfg", "nan"], "expected a finite --cfg ≥ 0 (0: the unconditional prediction), got nan"),
    (["--cfg", "inf"], "expected a finite --cfg ≥ 0 (0: the unconditional prediction), got inf"),
    (["--cfg", "-7"], "expected a finite --cfg ≥ 0 (0: the unconditional prediction), got -7.0"),
    (["--occupancy-threshold", "-1"], "expected --occupancy-threshold in (0, 1), got -1.0"),
    (["--occupancy-threshold", "2"], "expected --occupancy-threshold in (0, 1), got 2.0"),
    (["--faces", "0"], "expected --faces ≥ 1, got 0"),
    (["--seed", "-1"], "expected --seed in [0, 9223372036854775807], got -1"),
    (["--seed", str(2**64)], "expected --seed in [0, 9223372036854775807], got 18446744073709551616"),
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


def test_every_image_of_a_batch_gets_its_own_output_file(tmp_path):
    # x.png twice takes x_1 and x_2; x_1.png must not share x_1 with the first (its mesh was silently replaced).
    images = [Path("a/x_1.png"), Path("a/x.png"), Path("b/x.png"), Path("c/y.png")]
    paths = generate_cli.output_paths(images, str(tmp_path / "out") + "/", None)
    assert len(set(paths)) == len(images)
    assert [p.name for p in paths][-1] == "y.glb"  # a name no other image has stays as it is


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


def _write_bad_image(path, kind: str) -> None:
    """An input no run can use, of the kind named."""
    if kind == "not an image":
        path.write_bytes(b"garbage")
    elif kind == "zero bytes":
        path.write_bytes(b"")
    elif kind == "zero pixels":
        path.write_bytes(png_header_only(0, 0))
    elif kind == "truncated":
        path.write_bytes(png_header_only(64, 64))
    elif kind == "too small":
        Image.fromarray(rgba_image(8)).save(path)
    elif kind == "decompression bomb":
        path.write_bytes(png_header_only(100_000, 100_000))
    elif kind == "empty alpha":
        Image.fromarray(rgba_image() * 0).save(path)
    else:
        raise AssertionError(kind)


BAD_IMAGES = {
    "not an image": "cannot identify image file",
    "zero bytes": "the file is empty (0 bytes), expected a PNG, JPEG or other image file",
    "zero pixels": "cannot identify image file",
    "truncated": "image file is truncated",
    "too small": "expected at least 16x16 pixels, got 8x8",
    "decompression bomb": "is too large: expected at most",
    "empty alpha": "alpha channel is empty",
}


@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_a_bad_image_fails_before_the_weights_load(weights, tmp_path, capsys, no_loading, kind):
    bad = tmp_path / "bad.png"
    _write_bad_image(bad, kind)
    assert main(["generate", str(bad), "-o", str(tmp_path / "out"), *_fast(weights)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"d3s2 generate: error: {bad}: ") and BAD_IMAGES[kind] in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("inputs", [["{tmp}/missing.png"], ["{tmp}/no_images"], ["{tmp}/in", "{tmp}/missing.png"]])
def test_missing_inputs_fail_before_the_weights_load(weights, tmp_path, capsys, no_loading, inputs):
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "notes.txt").write_text("not an image")
    (tmp_path / "in").mkdir()
    Image.fromarray(rgba_image()).save(tmp_path / "in" / "good.png")
    assert main(["generate", *[i.format(tmp=tmp_path) for i in inputs], "-o", str(tmp_path / "out"),
                 *_fast(weights)]) == 1
    err = capsys.readouterr().err
    assert "input not found" in err or "no image files" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("progress", [False, True])
def test_a_batch_of_only_bad_images_reports_each_and_loads_nothing(weights, tmp_path, capsys, no_loading, progress):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, kind in enumerate(BAD_IMAGES):
        _write_bad_image(inputs / f"{i}.png", kind)
    args = ["generate", str(inputs), "-o", str(tmp_path / "out"), *_fast(weights)]
    assert main([a for a in args if progress is False or a != "--no-progress"]) == 1
    # What a terminal shows: each line after its last carriage return (the cleared "checking images" bar).
    lines = [line.split("\r")[-1] for line in capsys.readouterr().err.rstrip("\n").split("\n")]
    assert len(lines) == len(BAD_IMAGES)
    for i, (line, message) in enumerate(zip(lines, BAD_IMAGES.values())):
        assert line.startswith(f"d3s2 generate: error: {inputs / f'{i}.png'}: ") and message in line


def test_bad_images_are_reported_before_the_weights_load_and_the_good_ones_run(weights, tmp_path, capsys,
                                                                               monkeypatch):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _write_bad_image(inputs / "a_bad.png", "not an image")
    Image.fromarray(rgba_image()).save(inputs / "b_good.png")
    _write_bad_image(inputs / "c_bad.png", "empty alpha")
    real_load = ImageTo3DPipeline.from_pretrained.__func__
    reported_at_load = []

    def load_after_reports(cls, *args, **kwargs):
        reported_at_load.append(capsys.readouterr().err)
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(ImageTo3DPipeline, "from_pretrained", classmethod(load_after_reports))
    out = tmp_path / "out"
    assert main(["generate", str(inputs), "-o", str(out), *_fast(weights)]) == 1
    assert len(reported_at_load) == 1
    assert "a_bad.png: cannot read image" in reported_at_load[0]
    assert "c_bad.png: the image's alpha channel is empty" in reported_at_load[0]
    assert capsys.readouterr().err == ""  # nothing reported twice
    assert [p.name for p in out.iterdir()] == ["b_good.glb"]


def test_off_a_terminal_generate_draws_no_bars(weights, tmp_path, capsys):
    images = tmp_path / "in"
    images.mkdir()
    for name in "abc":  # three: the image check draws its bar from three images on
        Image.fromarray(rgba_image()).save(images / f"{name}.png")
    fast = [a for a in _fast(weights) if a != "--no-progress"]
    assert main(["generate", str(images), "-o", str(tmp_path / "out") + "/", *fast]) == 0
    captured = capsys.readouterr()  # pytest's stderr is not a terminal, as a redirected log
    assert "\r" not in captured.err and captured.out.count(" faces, watertight ") == 3


def test_an_empty_mesh_is_an_error_not_an_empty_file(weights, tmp_path, capsys, monkeypatch):
    # no surface in the decoded volume (e.g. --steps 1 on some images): the pipeline returns an empty mesh
    monkeypatch.setattr(ImageTo3DPipeline, "_post", lambda self, mesh, faces, device: trimesh.Trimesh())
    image = tmp_path / "a.png"
    Image.fromarray(rgba_image()).save(image)
    out = tmp_path / "a.glb"
    assert main(["generate", str(image), "-o", str(out), *_fast(weights)]) == 1
    assert "a.png: the generated mesh is empty" in capsys.readouterr().err
    assert not out.exists()


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


def test_an_error_is_not_followed_by_a_stale_progress_bar(weights, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(generate_cli, "bar_on_terminal", lambda progress=True: progress)  # as on a terminal
    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(flat)  # no object: fails in the "prepare" stage
    assert main(["generate", str(flat), "-o", str(tmp_path / "a.glb"), "--weights", str(weights),
                 "--resolution", "64", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "stage/s, prepare]" in err  # the bar was shown
    warning, error = err.splitlines()[-2:]
    assert warning.startswith(f"d3s2 generate: warning: {flat}: image has no alpha channel")
    assert "could not separate the object from the background" in error


@pytest.mark.parametrize(("extra", "message"), [
    (["--steps", "0"], "expected --steps ≥ 1, got 0"),
    (["--cfg", "nan"], "expected a finite --cfg ≥ 0 (0: the unconditional prediction), got nan"),
    (["--cfg", "-0.5"], "expected a finite --cfg ≥ 0 (0: the unconditional prediction), got -0.5"),
    (["--occupancy-threshold", "1"], "expected --occupancy-threshold in (0, 1), got 1.0"),
    (["--resolution", "100"], "expected --resolution in [64, 128] for {weights}, got 100"),
])
def test_eval_generate_rejects_unusable_arguments_before_loading(weights, tmp_path, capsys, no_loading, extra,
                                                                 message):
    assert main(["eval", "generate", "--data", str(tmp_path), "--out", str(tmp_path / "eval"), "--weights",
                 str(weights), "--device", "cpu", *extra]) == 1
    assert message.format(weights=weights) in capsys.readouterr().err


def test_every_image_of_a_batch_reports_its_own_warnings(weights, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    on_white = rgba_image()
    on_white[on_white[..., 3] == 0] = 255
    for name in ("a.png", "b.png"):  # no alpha: the background is estimated, with a warning for each
        Image.fromarray(on_white[..., :3]).save(inputs / name)
    assert main(["generate", str(inputs), "-o", str(tmp_path / "out"), *_fast(weights)]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "no alpha channel" in line]
    assert warned == [f"d3s2 generate: warning: {inputs / name}: image has no alpha channel (or an opaque one): "
                      "estimating the "
                      "background from the border colour; pass an RGBA image with the object's alpha for reliable "
                      "results" for name in ("a.png", "b.png")]


def test_a_warning_repeated_for_one_image_is_reported_once(capsys):
    with generate_cli.warnings_reported_for(Path("a.png")):
        for _ in range(2):  # as from a pipeline with two image encoders, each preparing the image
            warnings.warn("image has no alpha channel", UserWarning, stacklevel=1)
    assert capsys.readouterr().err == "d3s2 generate: warning: a.png: image has no alpha channel\n"


@pytest.mark.parametrize("case", ["tag data past the block (JPEG)", "not a TIFF header (PNG)"])
def test_damaged_exif_is_one_warning_line_naming_the_image(weights, tmp_path, capsys, case):
    data, fmt, _ = damaged_exif_images()[case]
    image = tmp_path / f"photo.{fmt.lower()}"
    image.write_bytes(data)
    main(["generate", str(image), "-o", str(tmp_path / "out"), *_fast(weights)])  # an empty mesh may fail it
    lines = capsys.readouterr().err.splitlines()
    exif_lines = [line for line in lines if "EXIF" in line]
    assert len(exif_lines) == 1
    assert exif_lines[0].startswith(f"d3s2 generate: warning: {image}: damaged EXIF metadata (")
    assert "no orientation could be read from it, so the pixels are used as stored" in exif_lines[0]
    assert all(line.startswith("d3s2 generate: ") for line in lines)  # none of Python's raw warning lines


def test_a_failing_image_reports_its_warnings_before_its_error(weights, tmp_path, capsys, no_loading):
    small = tmp_path / "small.png"
    Image.fromarray(rgba_image(8)).save(small, exif=b"Exif\0\0XX\0*\0\0\0\x08")
    assert main(["generate", str(small), "-o", str(tmp_path / "out"), *_fast(weights)]) == 1
    warning, error = capsys.readouterr().err.splitlines()
    assert warning.startswith(f"d3s2 generate: warning: {small}: damaged EXIF metadata (not a TIFF file")
    assert error == f"d3s2 generate: error: {small}: image {small}: expected at least 16x16 pixels, got 8x8"

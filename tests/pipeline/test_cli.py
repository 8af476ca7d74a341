import numpy as np
import pytest
import trimesh
from PIL import Image

from d3s2.cli import main

from .tiny import rgba_image, tiny_pipeline


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

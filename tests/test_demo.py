"""`d3s2 demo` without the bundled demo pipeline: the mesh → SDF → mesh demo (with it: tests/pipeline/test_demo.py)."""

import json

import pytest

import d3s2.pipeline
from d3s2.cli import main
from d3s2.demo import bundled_examples


@pytest.fixture
def no_demo_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(d3s2.pipeline, "demo_weights_dir", lambda: tmp_path / "no_demo_pipeline")


def test_bundled_examples_present():
    assert {"horse_lusitano", "spart_temple"} <= set(bundled_examples())


def test_demo_without_weights_runs_the_mesh_demo(no_demo_weights, tmp_path, capsys):
    # --image is what `make demo` passes; without the demo pipeline it cannot be used, and the demo says so.
    assert main(["demo", "--image", "ignored.png", "--example", "horse_lusitano", "--resolution", "64",
                 "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "horse_lusitano_report.json").read_text())
    assert report["output_watertight"]
    assert report["metrics"]["fscore@0.01"] > 0.9  # closed, outward-facing input → surface reproduced
    assert (tmp_path / "horse_lusitano_d3s2.glb").stat().st_size > 0
    assert (tmp_path / "horse_lusitano_compare.png").stat().st_size > 0
    assert not list(tmp_path.glob(".*"))
    out = capsys.readouterr().out
    assert "bundled demo pipeline is missing" in out and "watertight=True" in out


def test_demo_unknown_example_is_a_clear_error(no_demo_weights, tmp_path, capsys):
    assert main(["demo", "--example", "nope", "--out", str(tmp_path)]) == 1
    assert "unknown example 'nope'" in capsys.readouterr().err


def test_demo_missing_mesh_leaves_no_output_folder(no_demo_weights, tmp_path, capsys):
    out = tmp_path / "d1"
    assert main(["demo", "--mesh", str(tmp_path / "missing.obj"), "--out", str(out)]) == 1
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert "missing.obj: no such file" in last_line  # the progress bar is closed, not drawn again after it
    assert not out.exists()


def test_mesh_demo_on_the_base_install(no_demo_weights, tmp_path, monkeypatch, capsys, caplog):
    """Without the data extra (no libigl, no embree): torch SDF on the CPU, numpy renders, no geometry metrics."""
    import sys

    from d3s2.geometry import render, sdf

    for module in ("igl", "embreex"):
        monkeypatch.setitem(sys.modules, module, None)  # their import raises ImportError
    caches = (sdf._igl_installed, render._embree)
    for cache in caches:
        cache.cache_clear()
    try:
        assert main(["demo", "--example", "horse_lusitano", "--resolution", "64", "--out", str(tmp_path)]) == 0
    finally:
        for cache in caches:
            cache.cache_clear()
    report = json.loads((tmp_path / "horse_lusitano_report.json").read_text())
    assert report["output_watertight"] and report["metrics"] == {}
    assert (tmp_path / "horse_lusitano_compare.png").stat().st_size > 0
    assert "SDF uses the torch backend" in caplog.text and "geometry metrics are left out" in caplog.text
    assert caplog.text.count("ray casting uses the numpy fallback") == 1
    assert "watertight=True" in capsys.readouterr().out

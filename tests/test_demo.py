"""`d3s2 demo` on a bundled example: a watertight mesh close to the input, and every output file written."""

import json

from d3s2.cli import main
from d3s2.demo import bundled_examples


def test_bundled_examples_present():
    assert {"horse_lusitano", "spart_temple"} <= set(bundled_examples())


def test_demo_writes_watertight_mesh(tmp_path, capsys):
    assert main(["demo", "--example", "horse_lusitano", "--resolution", "64", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "horse_lusitano_report.json").read_text())
    assert report["output_watertight"]
    assert report["metrics"]["fscore@0.01"] > 0.9  # closed, outward-facing input → surface reproduced
    assert (tmp_path / "horse_lusitano_d3s2.glb").stat().st_size > 0
    assert (tmp_path / "horse_lusitano_compare.png").stat().st_size > 0
    assert not list(tmp_path.glob(".tmp-*"))
    assert "watertight=True" in capsys.readouterr().out


def test_demo_unknown_example_is_a_clear_error(tmp_path, capsys):
    assert main(["demo", "--example", "nope", "--out", str(tmp_path)]) == 1
    assert "unknown example 'nope'" in capsys.readouterr().err

"""`d3s2 eval generate` on a tiny built folder: files, metric ranges, and a perfect case scoring exactly 1."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from d3s2.cli import main
from d3s2.data.build import asset_path, load_asset, read_manifest
from d3s2.pipeline.evaluate import (
    GenerateEvalConfig,
    bbox_iou,
    evaluate_generation,
    mask_iou,
    read_rows,
    sdf_reference,
    source_reference,
)

from .tiny import tiny_pipeline

TINY = Path(__file__).resolve().parents[1] / "assets" / "0ad_tiny.npz"
# Two assets at 32³, band of 2 voxels, 2 views of 48² (the fixture has no test-split asset: --split all).
BUILD = ["--resolutions", "32", "--band", "0.0625", "--views", "2", "--image-size", "48", "--subset", "2",
         "--no-progress"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    assert main(["data", "build", "0ad", "--corpus", str(TINY), "--out", str(out), *BUILD]) == 0
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_pipeline().save_pretrained(tmp_path_factory.mktemp("eval") / "weights")


def test_eval_generate_cli(built, weights, tmp_path, capsys, caplog):
    out = tmp_path / "eval"
    with caplog.at_level(logging.INFO):  # pytest's stderr is not a terminal, as a redirected log
        rc = main(["eval", "generate", "--data", str(built), "--weights", str(weights), "--split", "all", "--out",
                   str(out), "--resolution", "64", "--device", "cpu", "--samples", "2000", "--renders", "1",
                   "--view", "1"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err  # no bar frames (loading, sampling or per asset)
    lines = [r.getMessage() for r in caplog.records if r.name == "d3s2.progress"]
    assert len(lines) == 1 and lines[0].startswith("eval generate: 2/2 assets, "), lines
    rows = read_rows(out)
    assert len(rows) == 2 and [r["view"] for r in rows] == [1, 1]
    for r in rows:
        for k in ("silhouette_iou", "silhouette_iou_bbox", "silhouette_iou_reference", "fscore@0.01", "watertight"):
            assert 0.0 <= r[k] <= 1.0, (k, r[k])
        assert r["chamfer_l1"] >= 0 and r["seconds"] > 0 and r["seconds_total"] >= r["seconds"]
        # The SDF closure at 32³ seen through the build's camera: the frames agree, so most of the mask matches.
        assert r["silhouette_iou_reference"] > 0.7
        assert r["error"] is None and r["faces"] > 0 and r["watertight"] == 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["assets"] == 2 and summary["reference"] == "sdf" and summary["reference_resolution"] == 32
    assert summary["means"]["silhouette_iou"] == pytest.approx(np.mean([r["silhouette_iou"] for r in rows]))
    assert summary["median_seconds"] == pytest.approx(np.median([r["seconds"] for r in rows]))
    pngs = list((out / "renders").glob("*.png"))
    assert len(pngs) == 1
    with Image.open(pngs[0]) as im:
        assert im.size == (3 * 48, 48)
    assert not list(out.rglob("*.tmp"))
    table = captured.out
    assert "mean" in table and "IoU-ref" in table and rows[0]["name"] in table


def test_eval_generate_exits_1_when_an_asset_failed_and_still_scores_it(built, weights, tmp_path, capsys,
                                                                         monkeypatch):
    from d3s2.pipeline.image_to_3d import ImageTo3DPipeline

    calls = []
    real = ImageTo3DPipeline.__call__

    def first_runs_out_of_memory(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (injected)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ImageTo3DPipeline, "__call__", first_runs_out_of_memory)
    out = tmp_path / "eval"
    assert main(["eval", "generate", "--data", str(built), "--weights", str(weights), "--split", "all", "--out",
                 str(out), "--resolution", "64", "--device", "cpu", "--samples", "500", "--renders", "0",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"d3s2 eval generate: error: 1 of 2 assets failed (each scored as an empty mesh; its error "
                       f"is in {out / 'per_asset.jsonl'})")
    rows = read_rows(out)
    assert [r["error"] for r in rows] == ["RuntimeError: out of memory (injected)", None]
    assert rows[0]["faces"] == 0 and rows[1]["faces"] > 0
    assert json.loads((out / "summary.json").read_text())["failed"] == 1


class _Oracle:
    """A stand-in pipeline that returns the asset's true (normalised source) mesh: a perfect generator."""

    resolutions = [32]

    def __init__(self, meshes):
        self.meshes = iter(meshes)

    def __call__(self, image, **kwargs):
        return next(self.meshes)


def test_perfect_generation_scores_one(built, tmp_path):
    names = sorted(read_manifest(built))
    records = read_manifest(built)
    truth = [source_reference(n, records[n], load_asset(asset_path(built, n))) for n in names]
    cfg = GenerateEvalConfig(split=None, reference="source", num_samples=2000, num_renders=0)
    summary = evaluate_generation(_Oracle(truth), built, tmp_path, cfg, progress=False)
    assert summary["assets"] == 2
    for r in read_rows(tmp_path):
        assert r["silhouette_iou"] == 1.0 and r["silhouette_iou_reference"] == 1.0 and r["silhouette_iou_bbox"] == 1.0
        assert r["chamfer_l1"] < 1e-6 and r["fscore@0.01"] == 1.0
    assert not (tmp_path / "renders").exists()


def test_sdf_reference_is_watertight_and_in_frame(built):
    name = sorted(read_manifest(built))[0]
    mesh = sdf_reference(load_asset(asset_path(built, name)), 32)
    assert mesh.is_watertight and np.abs(mesh.vertices).max() <= 1.0
    assert np.abs(mesh.bounds).max() == pytest.approx(0.95, abs=2 * 2 / 32)  # the build's scale, within 2 voxels


def test_mask_ious():
    a = np.zeros((20, 20), bool)
    a[2:8, 2:8] = True
    b = np.zeros_like(a)
    b[10:16, 10:16] = True  # same shape elsewhere
    assert mask_iou(a, b) == 0.0 and bbox_iou(a, b) == 1.0
    assert mask_iou(a, a) == 1.0 and mask_iou(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert bbox_iou(a, np.zeros_like(a)) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        mask_iou(a, a[:5])


def test_eval_generate_errors(built, weights, tmp_path, capsys):
    assert main(["eval", "generate", "--data", str(tmp_path), "--weights", str(weights), "--out",
                 str(tmp_path / "o")]) == 1
    assert "no build.json" in capsys.readouterr().err
    assert main(["eval", "generate", "--data", str(built), "--weights", str(weights), "--out", str(tmp_path / "o"),
                 "--view", "5", "--device", "cpu"]) == 1
    assert "expected view in [0, 2)" in capsys.readouterr().err
    # The fixture's two assets are both in the train split.
    assert main(["eval", "generate", "--data", str(built), "--weights", str(weights), "--out", str(tmp_path / "o"),
                 "--device", "cpu"]) == 1
    assert "no built asset in the test split" in capsys.readouterr().err

"""The ``dense_vae``, ``dit_dense`` and ``dit_sparse`` tasks: 2-step ``d3s2 train`` runs on the tiny encoded folder
write exports, the assembled pipeline loads with ``from_pretrained`` and turns an image into a mesh."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
import yaml
from PIL import Image

from d3s2.cli import main
from d3s2.config import PACKAGED_CONFIGS as CONFIGS
from d3s2.data.latents import LatentDataset
from d3s2.models.conditioner import SmallImageEncoder
from d3s2.models.dit import DenseDiT, SparseDiT
from d3s2.models.dit.task import DenseDiTTask, SparseDiTTask, SparseDiTTaskConfig
from d3s2.models.registry import from_pretrained
from d3s2.models.vae.dense_task import DenseVAETask, DenseVAETaskConfig
from d3s2.ops._backend import use_backend
from d3s2.pipeline.assemble import assemble_pipeline
from d3s2.pipeline.image_to_3d import ImageTo3DPipeline, LatentNorm
from d3s2.sparse.serialize import block_sort
from d3s2.train.task import get_task
from tests.pipeline.tiny import rgba_image

STEPS = ["--max-steps", "2", "--train.progress=false", "--train.val_every=2"]


@pytest.fixture(autouse=True)
def _torch_ops(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # set by kernel tests; 'auto' would interpret Triton
    with use_backend("conv", "torch"), use_backend("block_attn", "torch"), use_backend("ssa", "torch"):
        yield


@pytest.fixture(scope="module")
def runs(tiny_encoded, tmp_path_factory) -> dict[str, Path]:
    data, _, latents = tiny_encoded
    out = tmp_path_factory.mktemp("dit_runs")
    with use_backend("conv", "torch"), use_backend("block_attn", "torch"), use_backend("ssa", "torch"):
        assert main(["train", "dense_vae", "--config", str(CONFIGS / "debug/tiny_dense_vae_train.yaml"),
                     "--out", str(out / "dense_vae"), f"--task.args.latents={latents}",
                     f"--task.args.model_config={CONFIGS / 'debug/tiny_dense_vae.yaml'}", *STEPS]) == 0
        for task, extra in [("dit_dense", [f"--task.args.dense_vae={out / 'dense_vae' / 'export'}"]),
                            ("dit_sparse", [])]:
            assert main(["train", "dit", "--stage", task.split("_")[1],
                         "--config", str(CONFIGS / f"debug/tiny_{task}_train.yaml"),
                         "--out", str(out / task), f"--task.args.latents={latents}", f"--task.args.data={data}",
                         f"--task.args.model_config={CONFIGS / f'debug/tiny_{task}.yaml'}", *extra,
                         *STEPS]) == 0
        assert main(["train", "dit", "--stage", "sparse", "--config",
                     str(CONFIGS / "debug/tiny_dit_dense_train.yaml"), "--out", str(out / "wrong")]) == 1
    return {name: out / name for name in ("dense_vae", "dit_dense", "dit_sparse")}


def _val(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "val"][-1]


def test_registered():
    assert get_task("dense_vae") is DenseVAETask and get_task("dense_vae").family == "vae"
    assert get_task("dit_dense") is DenseDiTTask and get_task("dit_sparse") is SparseDiTTask
    assert DenseDiTTask.family == SparseDiTTask.family == "dit"


def test_runs_validate_and_export(runs):
    val = _val(runs["dense_vae"])
    assert {"bce", "dice", "kl", "iou", "recall"} <= set(val) and 0 <= val["iou"] <= 1
    assert from_pretrained(runs["dense_vae"] / "export").config.downsample == 2
    for task, cls in [("dit_dense", DenseDiT), ("dit_sparse", SparseDiT)]:
        assert {"loss_t25", "loss_t50", "loss_t75", "loss"} <= set(_val(runs[task]))
        export = runs[task] / "export"
        assert isinstance(from_pretrained(export / "dit"), cls)
        assert isinstance(from_pretrained(export / "conditioner"), SmallImageEncoder)
        info = json.loads((export / "dit_task.json").read_text())
        assert info["stage"] == task.removeprefix("dit_") and info["mesh_resolution"] == 32
        assert len(info["latent_mean"]) == len(info["latent_std"]) == (4 if task == "dit_dense" else 8)
        assert all(s > 0 for s in info["latent_std"]) and info["sampler"]["steps"] == 8


def test_sparse_statistics_and_batches(tiny_encoded):
    data, _, latents = tiny_encoded
    cfg = SparseDiTTaskConfig(latents=str(latents), data=str(data), val_fraction=0.3, test_fraction=0.0,
                              model_config=str(CONFIGS / "debug/tiny_dit_sparse.yaml"),
                              model_args={"resolution": 4, "in_channels": 8, "out_channels": 8},
                              conditioner_args={"image_size": 28}, sample_posterior=False)
    task = SparseDiTTask(cfg)
    train, val = task.build_datasets()
    assert len(val) == 1 and len(train) == 4  # the held-out asset of the name-hash split
    means = torch.cat([torch.from_numpy(np.load(p)["mean"].astype(np.float32))
                       for p in sorted((latents / "assets").rglob("*.npz")) if "ram_wheels" not in p.name])
    torch.testing.assert_close(task.mean, means.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(task.std, means.std(0, unbiased=False), atol=1e-4, rtol=1e-3)
    batch = task.collate([train[0], train[1]])
    x = batch["x"]
    assert batch["rgb"].shape == (2, 3, 28, 28) and batch["mask"].shape == (2, 28, 28)
    assert torch.equal(block_sort(x, task.block_size).perm, torch.arange(x.num_voxels))  # SSA order
    z = task.target(batch, sample=True)
    torch.testing.assert_close(z.feats.mean(0), torch.zeros(8), atol=1.0, rtol=0)  # normalised scale
    model = task.build_model()
    loss, logs = task.loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and set(logs) == {"t_mean", "dropped"}


@pytest.mark.parametrize("conditioner,changes,message", [
    ({}, {"model_args": {"selection_block_size": "4"}}, "model.args.selection_block_size: expected int, got str ('4')"),
    ({}, {"conditioner_args": {"image_size": "28"}}, "conditioner.args.image_size: expected int, got str ('28')"),
    ({"sparse": "yes"}, {}, "conditioner.sparse: expected bool, got str ('yes')"),
])
def test_mistyped_model_args_fail_when_the_task_is_made(tiny_encoded, tmp_path, conditioner, changes, message):
    data, _, latents = tiny_encoded
    dit_yaml = yaml.safe_load((CONFIGS / "debug/tiny_dit_sparse.yaml").read_text())
    dit_yaml["conditioner"].update(conditioner)
    (tmp_path / "dit.yaml").write_text(yaml.safe_dump(dit_yaml))
    cfg = SparseDiTTaskConfig(latents=str(latents), data=str(data), model_config=str(tmp_path / "dit.yaml"),
                              **changes)
    with pytest.raises(ValueError, match=re.escape(message)):
        SparseDiTTask(cfg)


def test_mistyped_dense_vae_args_fail_when_the_task_is_made(tiny_encoded):
    _, _, latents = tiny_encoded
    cfg = DenseVAETaskConfig(latents=str(latents), model_config=str(CONFIGS / "debug/tiny_dense_vae.yaml"),
                             model_args={"latent_channels": "4"})
    with pytest.raises(ValueError, match=re.escape("model.args.latent_channels: expected int, got str ('4')")):
        DenseVAETask(cfg)


def test_latent_dataset_views_and_repeat(tiny_encoded, tmp_path):
    data, _, latents = tiny_encoded
    ds = LatentDataset(latents, build=data, split=None, image_size=28, repeat=3, with_occupancy=True)
    assert len(ds) == 15 and ds.token_counts[:5] == ds.token_counts[5:10]
    item = ds[0]
    assert item["occupancy"].shape == (1, 4, 4, 4) and int(item["occupancy"].sum()) == len(item["coords"])
    assert item["rgb"].shape == (3, 28, 28) and 0 < float(item["mask"].mean()) < 1
    views = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        views.add(round(float(ds[0]["rgb"].sum()), 3))
    assert len(views) == 2  # two renders per asset, both drawn
    with pytest.raises(FileNotFoundError, match="no build.json"):
        LatentDataset(latents, build=tmp_path, split=None)
    (tmp_path / "build.json").write_text((data / "build.json").read_text())
    with pytest.raises(FileNotFoundError, match="5 encoded assets have no file in"):
        LatentDataset(latents, build=tmp_path, split=None)


def test_assembled_pipeline_generates(runs, tiny_encoded, tmp_path):
    _, vae, _ = tiny_encoded
    out = tmp_path / "pipeline"
    assemble_pipeline(sparse_vae=vae, dense_vae=runs["dense_vae"] / "export", dense_dit=runs["dit_dense"] / "export",
                      sparse_dit=runs["dit_sparse"] / "export", out=out, dense_sampler={"steps": 2},
                      sparse_sampler={"steps": 2}, occupancy_threshold=0.0)
    manifest = json.loads((out / "pipeline.json").read_text())
    assert "conditioner" not in manifest["components"]
    assert {"conditioner_dense_dit", "conditioner_sparse_dit_32", "sparse_dit_32", "sparse_vae_32"} <= set(
        manifest["components"])
    pipe = ImageTo3DPipeline.from_pretrained(out)
    assert pipe.encoder_for("dense_dit") is not pipe.encoder_for("sparse_dit_32")
    assert isinstance(pipe.settings.sparse_latent[32], LatentNorm) and pipe.settings.dense.steps == 2
    info = json.loads((runs["dit_sparse"] / "export" / "dit_task.json").read_text())
    assert pipe.settings.sparse_latent[32].std == info["latent_std"]
    image = tmp_path / "object.png"
    Image.fromarray(rgba_image(48)).save(image)
    mesh = pipe(str(image), device="cpu", progress=False)
    assert isinstance(mesh, trimesh.Trimesh) and len(mesh.faces) > 0 and mesh.is_watertight
    assert pipe.last_timing.tokens[32] == 64  # threshold 0: the whole 4³ structure
    glb = tmp_path / "gen"
    assert main(["generate", str(image), "-o", str(glb), "--weights", str(out), "--device", "cpu",
                 "--steps", "1"]) == 0
    assert len(list(glb.glob("*.glb"))) == 1


def test_latent_norm_round_trip():
    norm = LatentNorm(mean=[1.0, -2.0], std=[0.5, 3.0])
    z = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    torch.testing.assert_close(norm.denormalize(z, 1), torch.tensor([[1.0, 1.0], [2.0, -5.0]]))
    with pytest.raises(ValueError, match="expected 2 channels"):
        norm.denormalize(torch.zeros(3, 3), 1)
    with pytest.raises(ValueError, match="equal non-empty"):
        LatentNorm(mean=[0.0], std=[1.0, 2.0])

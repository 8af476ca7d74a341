"""The ``vae`` training task: a 2-step CLI run on a tiny built folder writes a checkpoint, a validation mesh and
an export that loads with ``from_pretrained``; multi-resolution packing groups; an in-process overfit on one
shape gives a close reconstruction through the same decode → closed-mesh path as validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import trimesh
import yaml

from d3s2.cli import main
from d3s2.config import PACKAGED_CONFIGS as CONFIGS
from d3s2.config import load_yaml
from d3s2.models.registry import from_pretrained
from d3s2.models.vae import SDFLossWeights, SparseSDFVAE
from d3s2.models.vae.task import (
    MultiResolutionDataset,
    SparseVAETask,
    SparseVAETaskConfig,
    decode_mesh,
    shape_metrics,
    target_mesh,
)
from d3s2.train.task import get_task
from tests.models.vae._data import BAND, RESOLUTION, build_tiny

TINY_MODEL = str(CONFIGS / "debug/tiny_vae.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("vae_task"))


def train_cli(data: Path, out: Path, *extra: str) -> int:
    """``d3s2 train vae`` on the tiny config; ``extra`` overrides replace the defaults set here (each key once)."""
    defaults = {"--task.args.data": str(data), "--task.args.model_config": TINY_MODEL,
                "--task.args.val_fraction": "0.5", "--train.val_every": "2", "--train.progress": "false"}
    given = {arg.partition("=")[0] for arg in extra}
    overrides = [f"{key}={value}" for key, value in defaults.items() if key not in given]
    return main(["train", "vae", "--config", str(CONFIGS / "debug/tiny_vae_train.yaml"), "--max-steps", "2",
                 "--out", str(out), *overrides, *extra])


def test_registered():
    assert get_task("vae") is SparseVAETask


def test_train_cli_writes_checkpoint_validation_and_export(data, tmp_path):
    assert train_cli(data, tmp_path / "run", "--task.args.resolutions=[16, 32]") == 0
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step_00000002.pt").is_file()
    val = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()
           if json.loads(line).get("split") == "val"]
    assert val and {"chamfer_l1", "fscore@0.01", "normal_consistency", "volume_iou"} <= set(val[-1])
    # 2 steps from random weights may decode an empty surface; a non-empty one must be closed
    assert val[-1]["watertight"] == 1.0 - val[-1]["empty_mesh"]
    snapshot = run / "val" / "step_00000002" / "reconstruction.glb"
    if val[-1]["empty_mesh"] == 0.0:
        assert trimesh.load(snapshot, force="mesh").is_watertight
    model = from_pretrained(run / "export")
    assert isinstance(model, SparseSDFVAE) and model.config.latent_channels == 8
    info = json.loads((run / "export" / "vae_task.json").read_text())
    # the split travels with the export, so `eval vae` scores shapes the model was not trained on
    assert info == {"band": pytest.approx(BAND), "resolutions": [16, 32], "val_fraction": 0.5, "test_fraction": 0.0}
    # the export drives `d3s2 reconstruct`
    trimesh.creation.icosphere(2, radius=0.5).export(tmp_path / "sphere.obj")
    out = tmp_path / "sphere.glb"
    rc = main(["reconstruct", str(tmp_path / "sphere.obj"), "-o", str(out), "--resolution", "32", "--weights",
               str(run / "export")])
    assert rc == 0 and trimesh.load(out, force="mesh").is_watertight


def test_config_errors(data):
    with pytest.raises(ValueError, match="multiples of 8"):
        SparseVAETaskConfig(data=str(data), resolutions=[30])
    with pytest.raises(ValueError, match="not \\[64\\]"):
        SparseVAETask(SparseVAETaskConfig(data=str(data), resolutions=[64]))
    with pytest.raises(ValueError, match="val_resolution"):
        SparseVAETaskConfig(data=str(data), resolutions=[32], val_resolution=16)
    with pytest.raises(FileNotFoundError, match="build.json"):
        SparseVAETask(SparseVAETaskConfig(data=str(data / "nope"), resolutions=[32]))


@pytest.mark.parametrize("args,override,message", [
    ({"num_blocks": "2"}, None, "model.args.num_blocks: expected int, got str ('2')"),
    ({"latent_channels": 8.0}, None, "model.args.latent_channels: expected int, got float (8.0)"),
    ({"loss": {"in_band": 1.0, "ext": 0.1, "sharp": 1.0, "kl": "small"}}, None,
     "model.args.loss.kl: expected float, got str ('small')"),
    # a task.args.model_args override is checked where it is given, before the task merges it with the model YAML
    ({}, "{model_channels: abc}", "task.args.model_args.model_channels (from --task.args.model_args={model_channels: "
                                  "abc}): expected int, got str ('abc')"),
    ({}, "{window_size: abc}", "task.args.model_args.window_size (from --task.args.model_args={window_size: abc}): "
                               "expected int, got str ('abc')"),
])
def test_mistyped_model_args_fail_before_the_run_writes_anything(data, tmp_path, capsys, args, override, message):
    model = load_yaml(TINY_MODEL)
    model["model"]["args"].update(args)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(model))
    extra = [f"--task.args.model_config={bad}"] + ([f"--task.args.model_args={override}"] if override else [])
    assert train_cli(data, tmp_path / "run", *extra) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_mistyped_model_args_override_names_itself_and_the_model_keys(data, tmp_path, capsys):
    assert train_cli(data, tmp_path / "run", "--task.args.model_args.depht=4") == 1
    err = capsys.readouterr().err
    assert "unknown key task.args.model_args.depht (from --task.args.model_args.depht=4); task.args.model_args " \
           "accepts: latent_channels, model_channels, num_blocks" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, train_model_args", [
    (["--task.args.model_args.loss.kl=0.01"], {}),
    (["--task.args.model_args.loss={kl: 0.01}"], {}),
    (["--task.args.model_args={loss: {kl: 0.01}}"], {}),
    ([], {"loss": {"kl": 0.01}}),  # in the train config's file
])
def test_a_model_args_section_sets_only_its_keys_of_the_model_yaml(data, tmp_path, overrides, train_model_args):
    from d3s2.train.trainer import build_train_config

    model = load_yaml(TINY_MODEL)
    model["model"]["args"]["loss"] = {"in_band": 2.0, "ext": 0.5, "sharp": 0.0, "kl": 0.001}  # none the default
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(model))
    train = {"task": {"name": "vae", "args": {"data": str(data), "resolutions": [RESOLUTION], "model_config": str(path),
                                              "model_args": train_model_args}},
             "train": {"max_steps": 1}}
    task = SparseVAETask(build_train_config(train, overrides).task.args)
    assert task.vae_config.loss == SDFLossWeights(in_band=2.0, ext=0.5, sharp=0.0, kl=0.01)


def test_a_version_1_checkpoint_with_a_model_args_section_resumes_only_when_allowed(data, tmp_path, capsys):
    # In checkpoint version 1 a section of model_args replaced the model YAML's whole section; the same config now
    # merges it key by key, so resuming would quietly train with other loss weights.
    run = tmp_path / "run"
    assert train_cli(data, run, "--task.args.model_args.loss.kl=0.01") == 0
    ckpt = run / "checkpoints" / "step_00000002.pt"
    torch.save({**torch.load(ckpt, weights_only=False), "version": 1}, ckpt)
    capsys.readouterr()
    assert train_cli(data, run, "--task.args.model_args.loss.kl=0.01", "--max-steps", "3", "--resume") == 1
    assert ("step_00000002.pt is a version-1 checkpoint, in which task.args.model_args.loss = {'kl': 0.01} replaced "
            "the model YAML's whole section") in capsys.readouterr().err
    assert train_cli(data, run, "--task.args.model_args.loss.kl=0.01", "--max-steps", "3", "--resume",
                     "--allow-config-change") == 0
    assert (run / "config.prev-00000002.yaml").is_file()
    # Without a section there the versions agree: it resumes as any checkpoint.
    plain = tmp_path / "plain"
    assert train_cli(data, plain, "--task.args.model_args.pe_factor=2.0") == 0
    ckpt = plain / "checkpoints" / "step_00000002.pt"
    torch.save({**torch.load(ckpt, weights_only=False), "version": 1}, ckpt)
    assert train_cli(data, plain, "--task.args.model_args.pe_factor=2.0", "--max-steps", "3", "--resume") == 0


def test_multi_resolution_groups_and_collate(data):
    task = SparseVAETask(SparseVAETaskConfig(data=str(data), resolutions=[32], val_fraction=0.5, test_fraction=0.0,
                                             model_config=TINY_MODEL))
    train, val = task.build_datasets()
    both = MultiResolutionDataset([train.parts[0], val.parts[0]])
    assert len(both) == len(train) + len(val) == 4
    assert both.token_counts == train.token_counts + val.token_counts
    assert {both.group(i) for i in range(4)} == {RESOLUTION}
    batch = task.collate([train[0], train[1]])
    assert batch.sdf.batch_size == 2 and batch.sdf.resolution == RESOLUTION
    assert float(batch.sdf.feats.abs().max()) < 1.0  # SDF / τ inside the band

    multi = SparseVAETask(SparseVAETaskConfig(data=str(data), resolutions=[16, 32], val_fraction=0.5,
                                              test_fraction=0.0, model_config=TINY_MODEL))
    train, val = multi.build_datasets()
    n = len(train) // 2
    assert [train.group(i) for i in range(len(train))] == [16] * n + [32] * n
    assert {val.group(i) for i in range(len(val))} == {32}  # validated at the largest R
    assert train[0]["name"] == train[n]["name"] and train[0]["resolution"] == 16
    assert multi.collate([train[0], train[1]]).sdf.resolution == 16
    with pytest.raises(ValueError, match="one resolution"):
        multi.collate([train[0], train[n]])


def test_item_costs_count_decoded_voxels_and_collate_prepares_structure(data):
    from d3s2.models.vae.sparse_sdf_vae import POOL_KEY

    task = SparseVAETask(SparseVAETaskConfig(data=str(data), resolutions=[32], val_fraction=0.5, test_fraction=0.0,
                                             model_config=TINY_MODEL, decode_cost=0.5))
    train, _ = task.build_datasets()
    blocks = [len(train[i]["block_coords"]) for i in range(len(train))]
    assert train.parts[0].block_counts == blocks
    assert train.item_costs() == [n + 0.5 * 512 * b for n, b in zip(train.token_counts, blocks)]
    train.decode_cost = 0.0
    assert train.item_costs() == train.token_counts
    batch = task.collate([train[0], train[1]])
    assert "down_2" in batch.sdf._cache and POOL_KEY in batch.sdf._cache  # built in the worker, not on the GPU
    with pytest.raises(ValueError, match="decode_cost"):
        SparseVAETaskConfig(data=str(data), decode_cost=-1.0)


def test_overfit_one_shape_reconstructs_it(data):
    """Quality, not only validity: 30 steps on one shape (the box) bring the closed mesh much closer to the
    target's (measured: Chamfer-L1 0.218 -> 0.084; a voxel is 0.0625)."""
    torch.manual_seed(0)
    task = SparseVAETask(SparseVAETaskConfig(data=str(data), resolutions=[32], model_config=TINY_MODEL))
    model = task.build_model()
    train, _ = task.build_datasets()
    batch = task.collate([train[0]])
    (ref,) = target_mesh(batch)
    def chamfer() -> float:
        model.eval()
        with torch.no_grad():
            (pred,) = decode_mesh(model, batch.sdf)
        model.train()
        return shape_metrics(pred, ref, 2000)["chamfer_l1"]

    before = chamfer()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    for _ in range(30):
        loss, _ = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    after = chamfer()
    assert after < 0.12 and after < 0.6 * before, (before, after)


def _assert_same_structure(a, b, path="cache"):
    """Equal structure caches: the same keys, equal tensors (values and dtypes), recursively."""
    import dataclasses

    from d3s2 import sparse as sp

    if isinstance(a, sp.SparseTensor):
        assert isinstance(b, sp.SparseTensor) and a.resolution == b.resolution and a.batch_size == b.batch_size
        _assert_same_structure(a.feats, b.feats, path + ".feats")
        _assert_same_structure(a.coords, b.coords, path + ".coords")
        assert sorted(a._cache) == sorted(b._cache), path
        for k in a._cache:
            _assert_same_structure(a._cache[k], b._cache[k], f"{path}[{k}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, tuple | list):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_same_structure(u, v, f"{path}[{i}]")
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            _assert_same_structure(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    else:
        assert a == b, path


@pytest.mark.parametrize("resolution", [16, RESOLUTION])
def test_collate_matches_the_unpacked_path(data, resolution):
    """The training collate (stored inside bits, rows found in the dataset, numpy structure) gives the model
    exactly what the earlier path gave (block targets in the dataset, SparseTensor collate, pack): every tensor
    and every prepared structure equal, on a batch of all samples in a shuffled order."""
    from d3s2.data.collate import collate_sparse
    from d3s2.data.dataset import SparseSDFDataset
    from d3s2.models.vae import PackedSDFBatch, SparseSDFBatch
    from d3s2.models.vae.sparse_sdf_vae import prepare_structure

    task = SparseVAETask(SparseVAETaskConfig(data=str(data), resolutions=[resolution], val_fraction=0.0,
                                             test_fraction=0.0, model_config=TINY_MODEL))
    train, _ = task.build_datasets()
    full = SparseSDFDataset(data, resolution, split="train", val_fraction=0.0, test_fraction=0.0, with_image=False)
    assert full.names == train.parts[0].names and len(full) == 4
    order = [2, 0, 3, 1]
    packed = task.collate([train[i] for i in order])
    assert isinstance(packed, PackedSDFBatch) and packed.inside is not None
    assert packed.blocks.num_channels == 0  # no per-voxel targets travel from the workers
    c = collate_sparse([full[i] for i in order])
    ref_packed = PackedSDFBatch.pack(c["sdf"], c["blocks"], sharp=c["sharp"], tau=task.band)
    prepare_structure(ref_packed.sdf, task.window_size, structure=ref_packed.blocks)
    _assert_same_structure(packed.sdf, ref_packed.sdf, "sdf")
    # The latent level (latent_structure "blocks"): the blocks' window partitions, prepared alike.
    assert sorted(packed.blocks._cache) == sorted(ref_packed.blocks._cache) and "window_8_0" in packed.blocks._cache
    for key in packed.blocks._cache:
        _assert_same_structure(packed.blocks._cache[key], ref_packed.blocks._cache[key], f"blocks[{key}]")
    assert torch.equal(packed.rows, ref_packed.rows) and torch.equal(packed.sharp, ref_packed.sharp)
    assert torch.equal(packed.blocks.coords, ref_packed.blocks.coords)
    got, ref = packed.to("cpu"), ref_packed.unpack()
    assert isinstance(got, SparseSDFBatch)
    for name in ("target", "sdf"):
        g, r = getattr(got, name), getattr(ref, name)
        assert torch.equal(g.coords, r.coords) and torch.equal(g.feats, r.feats), name
    assert torch.equal(got.in_band, ref.in_band) and torch.equal(got.sharp, ref.sharp)
    assert int(got.in_band.sum()) == got.sdf.num_voxels
    # Outside the band the targets are the truncation values, in it the band voxels' own SDF.
    assert set(got.target.feats[~got.in_band, 0].unique().tolist()) <= {-1.0, 1.0}
    loss, _ = task.loss(task.build_model(), packed)  # direct callers may pass the packed batch
    assert torch.isfinite(loss)

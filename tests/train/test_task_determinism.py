"""Every model family's training task on CPU, from its tiny debug config, with ``train.deterministic`` and two threads:
a second run, killed after its step-2 checkpoint, logs the same rows and saves the same checkpoint to the last bit,
and resumed from it continues exactly as the first (data order, posterior samples, flow timesteps and noise,
condition dropout, EMA, AdamW). The toy task's runs (DataLoader workers too) are in test_trainer.py and
test_run_control.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from d3s2.config import PACKAGED_CONFIGS as CONFIGS
from d3s2.config import load_yaml
from d3s2.models.registry import build_model, save_pretrained
from d3s2.ops._backend import use_backend
from d3s2.train.trainer import Trainer, load_train_config

from ._runs import assert_same_state, train_rows

STEPS = ["--train.max_steps=3", "--train.ckpt_every=2", "--train.log_every=1", "--train.val_every=0",
         "--train.progress=false", "--train.device=cpu", "--train.deterministic=true", "--data.num_workers=0"]


@pytest.fixture(autouse=True)
def _torch_ops(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # set by kernel tests; 'auto' would interpret Triton
    torch.set_num_threads(2)  # reductions split over threads (the package's fixture restores the count)
    with use_backend("conv", "torch"), use_backend("block_attn", "torch"), use_backend("ssa", "torch"):
        yield


@pytest.fixture(scope="module")
def dense_vae(tmp_path_factory) -> Path:
    """A random dense VAE export the size tiny_dense_vae_train.yaml trains (the frozen encoder of dit_dense)."""
    args = {**load_yaml(CONFIGS / "debug/tiny_dense_vae.yaml")["model"]["args"],
            **load_yaml(CONFIGS / "debug/tiny_dense_vae_train.yaml")["task"]["args"]["model_args"]}
    torch.manual_seed(0)
    return save_pretrained(build_model("dense_shape_vae", args), tmp_path_factory.mktemp("dense_vae") / "export")


def _overrides(task: str, data: Path, latents: Path, dense_vae: Path) -> list[str]:
    model = {"vae": "tiny_vae", "dense_vae": "tiny_dense_vae", "dit_dense": "tiny_dit_dense",
             "dit_sparse": "tiny_dit_sparse"}[task]
    paths = {"vae": {"data": data}, "dense_vae": {"latents": latents},
             "dit_dense": {"latents": latents, "data": data, "dense_vae": dense_vae},
             "dit_sparse": {"latents": latents, "data": data}}[task]
    return [f"--task.args.model_config={CONFIGS / f'debug/{model}.yaml'}",
            *(f"--task.args.{key}={value}" for key, value in paths.items()), *STEPS]


@pytest.mark.parametrize("task", ["vae", "dense_vae", "dit_dense", "dit_sparse"])
def test_deterministic_runs_and_resume_are_bit_identical(task, tiny_encoded, dense_vae, tmp_path):
    data, _, latents = tiny_encoded
    config = CONFIGS / f"debug/tiny_{task}_train.yaml"
    overrides = _overrides(task, data, latents, dense_vae)

    def trainer(name: str, **kw) -> Trainer:  # made right before its run: trainers share the process's RNGs
        return Trainer(load_train_config(config, overrides), tmp_path / name, **kw)

    trainer("full").run()
    trainer("killed").run(stop_after=2)
    want = train_rows(tmp_path / "full")
    assert sorted(want) == [1, 2, 3] and want[3]["epoch"] >= 1  # an epoch ended on the way
    assert train_rows(tmp_path / "killed") == {s: want[s] for s in (1, 2)}, json.dumps(want)
    checkpoints = tmp_path / "full" / "checkpoints", tmp_path / "killed" / "checkpoints"
    assert_same_state(*(c / "step_00000002.pt" for c in checkpoints))

    resumed = trainer("killed", resume="latest")
    assert resumed.step == 2
    resumed.run()
    assert train_rows(tmp_path / "killed") == want
    assert_same_state(*(c / "step_00000003.pt" for c in checkpoints))

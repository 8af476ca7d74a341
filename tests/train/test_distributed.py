"""Wrapping from outside: module matching and activation checkpointing keep names and gradients."""

from __future__ import annotations

import pytest
import torch

from d3s2.train import distributed as D
from d3s2.train.toy import ToyConfig, ToyTask


def _toy_batch():
    task = ToyTask(ToyConfig(num_train=3, resolution=8, channels=8))
    train, _ = task.build_datasets()
    return task, task.collate([train[i] for i in range(3)])


def test_match_modules_by_class_and_pattern():
    task, _ = _toy_batch()
    model = task.build_model()
    names = [n for n, _ in D.match_modules(model, ["SparseConv3d"])]
    assert names == ["encoder.0", "to_latent.0", "decoder.0"]
    # An outer match hides the modules inside it.
    assert [n for n, _ in D.match_modules(model, ["encoder", "encoder.*"])] == ["encoder"]
    with pytest.raises(ValueError, match=r"pattern\(s\) \['Nope'\] matched no submodule"):
        D.match_modules(model, ["Nope"])


def test_activation_checkpointing_same_loss_and_grads():
    task, batch = _toy_batch()
    torch.manual_seed(0)
    plain = task.build_model()
    torch.manual_seed(0)
    ckpt = task.build_model()
    wrapped = D.apply_activation_checkpointing(ckpt, ["encoder", "decoder"])
    assert wrapped == ["encoder", "decoder"]
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # parameter names unchanged
    losses = []
    for model in (plain, ckpt):
        loss, _ = task.loss(model, batch)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)


def test_single_process_helpers():
    info = D.init_distributed("cpu")
    assert info.world_size == 1 and info.is_main and not info.distributed
    model = torch.nn.Linear(2, 2)
    assert D.parallelize(model, info, mode="ddp") is model and D.unwrap(model) is model
    assert D.all_reduce_mean({"a": 2.0}, info) == {"a": 2.0}
    assert D.gather_objects(3, info) == [3]
    with D.gradient_sync(model, enabled=False):
        pass


def test_exposed_output_hooks_keep_the_output():
    from dataclasses import dataclass

    from d3s2.sparse import SparseTensor

    @dataclass
    class Out:
        x: SparseTensor
        extra: dict

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x: SparseTensor) -> Out:
            return Out(x.replace(x.feats * self.w), {"n": [self.w.sum()]})

    m = M()
    x = SparseTensor.from_samples([torch.zeros(1, 3, dtype=torch.int32)], [torch.ones(1, 2)], resolution=4)
    seen = []
    unwrap_hook = D._expose_output_tensors(m)
    m.register_forward_hook(lambda mod, args, out: seen.append(out))  # where FSDP's post-forward would run
    m.register_forward_hook(unwrap_hook)
    out = m(x)
    assert isinstance(out, Out) and torch.equal(out.x.feats, torch.ones(1, 2))
    assert isinstance(seen[0], D._Exposed) and len(seen[0].tensors) == 3  # feats, coords, w.sum()
    assert any(t is out.x.feats for t in seen[0].tensors)

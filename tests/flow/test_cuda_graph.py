import logging

import pytest
import torch

from d3s2.flow import cuda_graph, sample_euler
from d3s2.flow.cuda_graph import ENV_VAR, GraphedStep, use_cuda_graphs
from d3s2.sparse import SparseTensor


def test_use_cuda_graphs_never_off_cuda_and_reads_the_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert not use_cuda_graphs(torch.device("cpu"))
    assert not use_cuda_graphs(torch.device("cpu"), True)
    cuda = torch.device("cuda")  # a device object needs no GPU
    assert use_cuda_graphs(cuda)
    assert not use_cuda_graphs(cuda, False)
    monkeypatch.setenv(ENV_VAR, "0")
    assert not use_cuda_graphs(cuda) and use_cuda_graphs(cuda, True)
    monkeypatch.setenv(ENV_VAR, "On")
    assert use_cuda_graphs(cuda)
    monkeypatch.setenv(ENV_VAR, "maybe")
    with pytest.raises(ValueError, match=ENV_VAR):
        use_cuda_graphs(cuda)


def test_disabled_graphed_step_calls_the_function_every_time():
    calls = []

    def fn(x, t):
        calls.append(x.clone())
        return x * t

    step = GraphedStep(fn, enabled=False, name="Toy")
    for i in range(3):
        out = step(torch.full((2,), float(i)), torch.tensor(2.0))
        assert torch.equal(out, torch.full((2,), 2.0 * i))
    assert len(calls) == 3 and not step.replaying


class _Prepared(torch.nn.Module):
    """Dense toy model with a condition preparation step that must run once per sampling call."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.prepared = 0

    def prepare_condition(self, cond):
        self.prepared += 1
        return {"scaled": cond * 2}

    def forward(self, x, t, cond):
        return self.lin(x) * torch.tanh(t / 1000)[:, None] + cond["scaled"]


def test_sampler_prepares_the_condition_once_and_cpu_ignores_cuda_graph():
    model = _Prepared()
    noise = torch.randn(2, 3)
    cond, uncond = torch.randn(2, 3), torch.zeros(2, 3)
    out = sample_euler(model, noise, steps=4, cond=cond, uncond=uncond, guidance_scale=3.0, cuda_graph=True)
    assert model.prepared == 1
    ref = sample_euler(lambda x, t, c: model(x, t, {"scaled": c * 2}), noise, steps=4, cond=cond, uncond=uncond,
                       guidance_scale=3.0, cuda_graph=False)
    assert torch.equal(out, ref)
    single = sample_euler(model, noise, steps=2, cond=cond)
    assert model.prepared == 2 and single.shape == noise.shape


# ------------------------------------------------------------------------------------------------ GPU
def _ball_shell(g: int) -> torch.Tensor:
    ax = torch.arange(g)
    c = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    d = ((c.float() + 0.5) / g * 2 - 1).norm(dim=1)
    return c[(d - 0.6).abs() < 2.0 / g].to(torch.int32)


def _graph_vs_eager(model, noise, cond, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    made = []

    class Recording(GraphedStep):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr("d3s2.flow.sampler.GraphedStep", Recording)
    kw = dict(steps=5, cond=cond, uncond=cond.zeros_like(), guidance_scale=7.0, shift=6.0)
    eager = sample_euler(model, noise, cuda_graph=False, **kw)
    graphed = sample_euler(model, noise, cuda_graph=True, **kw)
    assert not made[0].replaying and made[1].replaying  # the second call really replayed a graph
    return graphed, eager


@pytest.mark.gpu
def test_graph_replay_equals_eager_dense_dit(monkeypatch):
    from d3s2.models.dit import ConditionTokens, DenseDiT

    dev = torch.device("cuda")
    with dev:
        model = DenseDiT(DenseDiT.Config(resolution=8, model_channels=128, cond_channels=64, num_blocks=2,
                                         num_heads=2)).to(torch.bfloat16).eval()
        torch.nn.init.normal_(model.out_layer.weight, std=0.02)
        noise = torch.randn(1, 8, 8, 8, 8, dtype=torch.bfloat16)
        cond = ConditionTokens(torch.randn(1, 20, 64, dtype=torch.bfloat16))
    graphed, eager = _graph_vs_eager(model, noise, cond, monkeypatch)
    assert eager.abs().max() > 0 and torch.equal(graphed, eager)


@pytest.mark.gpu
def test_graph_replay_equals_eager_sparse_dit_ssa(monkeypatch):
    from d3s2.models.dit import ConditionTokens, SparseDiT
    from d3s2.sparse.serialize import sort_by_blocks

    dev = torch.device("cuda")
    cfg = SparseDiT.Config(resolution=16, model_channels=128, cond_channels=32, num_blocks=2, num_heads=4,
                           num_kv_heads=2, compression_block_size=4, selection_block_size=4, topk=2, window_size=4)
    with dev:
        model = SparseDiT(cfg).to(torch.bfloat16).eval()
        torch.nn.init.normal_(model.out_layer.weight, std=0.02)
        cond = ConditionTokens(torch.randn(1, 20, 32, dtype=torch.bfloat16))
    coords = _ball_shell(16).to(dev)
    x = SparseTensor.from_samples([coords], [torch.zeros(coords.shape[0], 16, device=dev)], resolution=16)
    x = sort_by_blocks(x, 4)
    noise = x.replace(torch.randn(x.num_voxels, 16, device=dev, dtype=torch.bfloat16))
    graphed, eager = _graph_vs_eager(model, noise, cond, monkeypatch)
    assert eager.feats.abs().max() > 0 and torch.equal(graphed.feats, eager.feats)


@pytest.mark.gpu
def test_failed_capture_falls_back_to_eager_and_warns_once(caplog, monkeypatch):
    monkeypatch.setattr(cuda_graph, "_FAILED", set())

    def syncing(x, t):
        return x * float(t.sum().item())  # a host sync: not capturable

    x, t = torch.ones(4, device="cuda"), torch.ones(1, device="cuda")
    outs = []
    with caplog.at_level(logging.WARNING, logger="d3s2.flow.cuda_graph"):
        for name in ("Syncing", "Syncing"):
            step = GraphedStep(syncing, enabled=True, name=name)
            outs += [step(x, t * i).clone() for i in range(1, 4)]
            assert not step.replaying
    assert [float(o[0]) for o in outs] == [1.0, 2.0, 3.0] * 2
    assert sum("capture of Syncing failed" in r.message for r in caplog.records) == 1
    y = torch.arange(3.0, device="cuda")
    assert torch.equal(y * 2, y + y)  # the device still works after the failed capture

import numpy as np
import pytest
import torch
from torch import nn

from d3s2.pipeline.residency import PackedWeights, WeightResidency

from .tiny import rgba_image, tiny_pipeline


class _Net(nn.Module):
    """Tied parameter, shared float buffer in two slots, an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 5)
        self.b.weight = nn.Parameter(self.a.weight.t().contiguous())
        self.c = nn.Linear(5, 5)
        self.tie = nn.Module()
        self.tie.w = self.a.weight  # the same Parameter in a second module
        scale = torch.linspace(0.5, 1.5, 5)
        self.register_buffer("scale", scale)
        self.c.register_buffer("scale", scale)  # the same tensor in a second slot
        self.register_buffer("steps", torch.arange(3))

    def forward(self, x):
        return self.c(self.b(self.a(x * self.scale))) * self.c.scale + self.steps.sum()


def _storages(m: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*m.parameters(), *m.buffers()]}


def test_packed_weights_round_trip_and_write_back():
    torch.manual_seed(0)
    net = _Net()  # not .double(): that would convert the shared buffer once per slot
    x = torch.randn(4, 5)
    ref = net(x)
    pw = PackedWeights(net, torch.float32, pin=False)
    assert len(_storages(net)) == 1 and net.scale is net.c.scale and net.tie.w is net.a.weight
    assert net.steps.dtype == torch.int64 and pw.device is None
    torch.testing.assert_close(net(x), ref, rtol=0, atol=0)
    home = next(iter(_storages(net)))
    pw.load(torch.device("cpu"), None)
    assert pw.device == torch.device("cpu") and next(iter(_storages(net))) != home and pw.intact()
    torch.testing.assert_close(net(x), ref, rtol=0, atol=0)
    with torch.no_grad():
        net.a.bias.add_(1.0)  # written while "on the device": must survive the eviction
    expected = net(x)
    pw.evict()
    assert _storages(net) == {home}
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
    pw.release()
    assert len(_storages(net)) == len(list(net.parameters())) + 2  # scale (shared) and steps
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)


def test_packed_weights_cast_floating_only():
    net = _Net()
    PackedWeights(net, torch.bfloat16, pin=False)
    assert net.a.weight.dtype == torch.bfloat16 and net.scale.dtype == torch.bfloat16
    assert net.steps.dtype == torch.int64 and torch.equal(net.steps, torch.arange(3))
    assert all((t.data_ptr() - t.untyped_storage().data_ptr()) % 256 == 0 for t in [*net.parameters(), *net.buffers()])


def _where(res: WeightResidency, mods: dict[str, nn.Module]) -> set[str]:
    return {k for k, m in mods.items() if res.on_device(m)}


@pytest.mark.parametrize("mode", ["prefetch", "low_vram"])
def test_residency_window_follows_the_plan(mode):
    mods = {k: nn.Linear(3, 3) for k in "abcdef"}
    plan = [mods[k] for k in "abcde"]
    res = WeightResidency(lookahead=2)
    res.begin(plan, torch.device("cpu"), torch.float32, mode, others=list(mods.values()))
    ahead = 2 if mode == "prefetch" else 0
    assert _where(res, mods) == set("abc"[: ahead + 1] if mode == "prefetch" else "a")
    seen = []
    for i, k in enumerate("abcde"):
        with res.use(mods[k]):
            seen.append(_where(res, mods))
            assert seen[-1] == set("abcde"[i: i + ahead + 1])
        assert res.on_device(mods[k]) == (mode == "prefetch")
    assert "f" not in set().union(*seen)
    res.end()
    assert _where(res, mods) == set() and res.device_bytes() == 0


def test_residency_resident_mode_places_modules_and_repacks_after_outside_moves():
    mods = [nn.Linear(3, 3), nn.Linear(3, 3)]
    res = WeightResidency()
    res.begin(mods, torch.device("cpu"), torch.float32, "prefetch")
    res.end()
    mods[0].double()  # replaced from outside: the packing is stale
    res.begin(mods, torch.device("cpu"), torch.float32, "prefetch")
    with res.use(mods[0]):
        assert mods[0].weight.dtype == torch.float32 and res.packed[id(mods[0])].intact()
    res.end()
    res.begin(mods, torch.device("cpu"), torch.float64, "resident")
    assert not res.packed and all(m.weight.dtype == torch.float64 for m in mods)
    assert len({p.untyped_storage().data_ptr() for m in mods for p in m.parameters()}) == 4
    with pytest.raises(ValueError, match="residency"):
        res.begin(mods, torch.device("cpu"), torch.float32, "sometimes")


def _record_running(pipe):
    """Hooks recording, at every module call, which component runs and which are on the device."""
    comps = pipe.components()
    log: list[tuple[str, set[str]]] = []
    handles = []
    for name, comp in comps.items():
        def hook(_mod, _args, name=name):
            log.append((name, {k for k, m in comps.items() if pipe.weights.on_device(m)}))
        handles += [sub.register_forward_pre_hook(hook) for sub in comp.modules()]
    return log, handles


def test_pipeline_prefetch_equals_resident_and_only_the_window_is_on_the_device():
    pipe = tiny_pipeline()
    ref = pipe(rgba_image(), resolution=64, seed=0, progress=False, device="cpu", residency="resident")
    log, handles = _record_running(pipe)
    try:
        mesh = pipe(rgba_image(), resolution=64, seed=0, progress=False, device="cpu", residency="prefetch")
    finally:
        for h in handles:
            h.remove()
    assert np.array_equal(mesh.vertices, ref.vertices) and np.array_equal(mesh.faces, ref.faces)
    plan = ["conditioner", "dense_dit", "dense_vae", "sparse_dit_64", "sparse_vae_64"]
    running = list(dict.fromkeys(name for name, _ in log))
    assert running == plan
    for name, on in log:
        i = plan.index(name)
        assert name in on and on <= set(plan[i: i + 3]), (name, on)
    assert all(not pipe.weights.on_device(m) for m in pipe.components().values())  # nothing left after a call
    assert "sparse_dit_128" not in set().union(*(on for _, on in log))


def test_pipeline_save_after_prefetch_call(tmp_path):
    pipe = tiny_pipeline()
    pipe(rgba_image(), resolution=64, seed=0, progress=False, device="cpu", residency="low_vram")
    out = pipe.save_pretrained(tmp_path / "p")  # packed weights share storage: saving must still work
    assert (out / "dense_dit").is_dir() and not pipe.weights.packed


@pytest.mark.gpu
def test_pipeline_stage_models_on_cuda_and_others_on_the_host():
    pipe = tiny_pipeline()
    kw = dict(resolution=64, seed=0, progress=False, device="cuda", dtype=torch.float32)
    ref = pipe(rgba_image(), residency="resident", **kw)
    pipe.weights.release()
    comps = pipe.components()
    log: list[tuple[str, set[str]]] = []
    handles = []
    for name, comp in comps.items():
        def hook(_mod, _args, name=name):
            log.append((name, {k for k, m in comps.items() if next(m.parameters()).is_cuda}))
        handles += [sub.register_forward_pre_hook(hook) for sub in comp.modules()]
    try:
        mesh = pipe(rgba_image(), **kw)  # the default on CUDA: prefetch
    finally:
        for h in handles:
            h.remove()
    # Same weights either way; only run-to-run GPU nondeterminism may move a few faces.
    assert abs(len(mesh.faces) - len(ref.faces)) <= 0.02 * len(ref.faces)
    if len(mesh.faces) == len(ref.faces):
        np.testing.assert_allclose(mesh.vertices, ref.vertices, atol=1e-3)
    plan = ["conditioner", "dense_dit", "dense_vae", "sparse_dit_64", "sparse_vae_64"]
    for name, on in log:
        i = plan.index(name)
        assert name in on and on <= set(plan[i: i + 3]), (name, on)
    assert not any(next(m.parameters()).is_cuda for m in comps.values())
    assert next(comps["sparse_dit_64"].parameters()).is_pinned()


def test_residency_module_used_at_two_stages_keeps_the_window_ahead():
    a, b, c, d = (nn.Linear(2, 2) for _ in range(4))
    res = WeightResidency(lookahead=1)
    res.begin([a, b, a, c, d], torch.device("cpu"), torch.float32, "prefetch")
    on = []
    for m in (a, b, a, c, d):
        with res.use(m):
            on.append({n for n, x in zip("abcd", (a, b, c, d), strict=True) if res.on_device(x)})
    assert on == [{"a", "b"}, {"b", "a"}, {"a", "c"}, {"c", "d"}, {"d"}]
    res.end()


@pytest.mark.gpu
def test_side_stream_prefetch_is_waited_for():
    torch.manual_seed(0)
    net = nn.Sequential(*(nn.Linear(512, 512) for _ in range(4)))
    x = torch.randn(64, 512)
    ref = net(x)
    res = WeightResidency(lookahead=2)
    res.begin(list(net), torch.device("cuda"), torch.float32, "prefetch")
    h = x.cuda()
    for layer in net:
        with res.use(layer):
            assert layer.weight.is_cuda
            h = layer(h)
    torch.testing.assert_close(h.cpu(), ref, rtol=1e-4, atol=1e-4)
    res.end()
    assert all(p.is_pinned() and not p.is_cuda for p in net.parameters()) and res.device_bytes() == 0


def test_pipeline_residency_choice():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="residency"):
        pipe(rgba_image(), resolution=64, device="cpu", progress=False, residency="sometimes")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pipe._residency_mode(None, None, cpu) == "resident" and pipe._residency_mode(None, None, cuda) == "prefetch"
    assert pipe._residency_mode(None, True, cuda) == "low_vram" and pipe._residency_mode(None, True, cpu) == "resident"
    pipe.residency = "resident"
    assert pipe._residency_mode(None, None, cuda) == "resident"
    assert pipe._residency_mode("prefetch", None, cuda) == "prefetch"


def test_evict_copies_back_only_after_writes():
    net = _Net()
    pw = PackedWeights(net, torch.float32, pin=False)
    pw.load(torch.device("cpu"), None)
    net(torch.randn(2, 5))  # reading the weights is no write
    pw.home_views[0].fill_(42.0)  # a marker in the host copy: a copy-back would overwrite it
    pw.evict()
    assert bool((net.a.weight == 42.0).all())

"""Per-call backend resolution: argument > context > env var > auto; auto never picks the Triton interpreter."""

import pytest
import torch

from d3s2.ops import BackendUnavailableError, use_backend
from d3s2.ops._backend import OpBackends, needs_triton, triton_available


def _table():
    t = OpBackends("probe_op")
    t.register("triton", needs_triton)
    t.register("torch")
    return t


def test_precedence(monkeypatch):
    t = _table()
    x = torch.zeros(2)
    monkeypatch.setenv(t.env_var, "torch")
    assert t.resolve(None, x) == "torch"
    with use_backend("probe_op", "auto"):
        assert t.resolve(None, x) == "torch"  # auto on CPU → the reference
        assert t.resolve("torch", x) == "torch"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(BackendUnavailableError, match="unknown backend 'nope'.*expected one of"):
        _table().resolve("nope", torch.zeros(1))


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_auto_ignores_interpreter_but_explicit_request_uses_it(monkeypatch):
    t = _table()
    x = torch.zeros(2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert t.resolve(None, x) == "torch"
    assert t.resolve("triton", x) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="not on a CUDA device"):
        t.resolve("triton", x)

"""Exponential moving average of a model's trainable parameters, kept in fp32 beside the model.

Works on plain, DDP-unwrapped and FSDP2-sharded models: with FSDP the averages are DTensors sharded like
the parameters, and :meth:`EMA.state_dict` gathers full tensors (a collective: call it on every rank).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["EMA"]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


class EMA:
    """``ema = decay_n · ema + (1 − decay_n) · param`` after every optimizer step.

    ``decay_n = min(decay, (1 + n) / (10 + n))`` with ``warmup`` (n = updates so far), else ``decay``.
    """

    def __init__(self, model: nn.Module, *, decay: float, warmup: bool = True) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"expected 0 < decay < 1, got {decay}")
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        with torch.no_grad():
            self.params = {name: p.detach().clone().float() for name, p in model.named_parameters()
                           if p.requires_grad}
        dtensor = _dtensor_type()
        self._sharded = dtensor is not None and any(isinstance(v, dtensor) for v in self.params.values())

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def _matched(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        named = dict(model.named_parameters())
        missing = [n for n in self.params if n not in named]
        if missing:
            raise ValueError(f"model lacks EMA parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
        return list(self.params.values()), [named[n] for n in self.params]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        ema, params = self._matched(model)
        if self._sharded:
            for e, p in zip(ema, params):
                e.lerp_(p.detach().float(), weight)
        else:
            torch._foreach_lerp_(ema, [p.detach().float() for p in params], weight)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averages into the model's parameters (cast to their dtype)."""
        ema, params = self._matched(model)
        for e, p in zip(ema, params):
            p.copy_(e.to(p.dtype))

    @contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily swap the averages into ``model`` (e.g. for validation); the weights come back after."""
        _, params = self._matched(model)
        with torch.no_grad():
            backup = [p.detach().clone() for p in params]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        """Full fp32 tensors on the CPU by parameter name (gathers shards: call on every rank)."""
        dtensor = _dtensor_type()
        full = {}
        for name, v in self.params.items():
            t = v.full_tensor() if dtensor is not None and isinstance(v, dtensor) else v
            full[name] = t.detach().cpu()
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "params": full}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = state["params"]
        if set(params) != set(self.params):
            extra, missing = sorted(set(params) - set(self.params)), sorted(set(self.params) - set(params))
            raise ValueError(f"EMA state does not match the model: unexpected {extra[:5]}, missing {missing[:5]}")
        dtensor = _dtensor_type()
        for name, v in self.params.items():
            src = params[name]
            if dtensor is not None and isinstance(v, dtensor):
                from torch.distributed.tensor import distribute_tensor

                src = distribute_tensor(src.to(v.device_mesh.device_type), v.device_mesh, v.placements)
            else:
                src = src.to(v.device)
            if src.shape != v.shape:
                raise ValueError(f"EMA {name}: expected shape {tuple(v.shape)}, got {tuple(src.shape)}")
            v.copy_(src)
        self.num_updates = int(state["num_updates"])

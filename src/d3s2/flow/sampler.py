"""Euler sampler for rectified-flow models with classifier-free guidance.

The schedule matches diffusers' ``FlowMatchEulerDiscreteScheduler`` (``set_timesteps(steps)``), which the
published pipeline uses: ``num_train_timesteps`` = 1000, shift 6 (dense), 6 (sparse 512³) and 8 (sparse 1024³).
Sigmas run from 1 (noise) to 0 (data); the model is called with ``sigma * num_train_timesteps`` and predicts
the velocity ``noise - x0``, so one Euler step is ``x ← x + (sigma_next - sigma)·v``.

With guidance, the conditional and unconditional passes run as ONE batched forward: the batch is
``[x, x]`` with conditions ``[cond, uncond]``; ``v = v_u + scale·(v_c - v_u)``.

The condition is constant over a stage: a model with ``prepare_condition(cond)`` (the DiTs: condition
embedding and every block's cross-attention keys/values) gets it prepared once and the result at every step.
On CUDA the per-step call is replayed from a CUDA graph (:mod:`d3s2.flow.cuda_graph`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

from ..sparse import SparseTensor
from .cuda_graph import GraphedStep, use_cuda_graphs
from .training import NUM_TRAIN_TIMESTEPS, Latent, shift_timesteps

ModelFn = Callable[[Latent, torch.Tensor, Any], Latent]


def euler_sigmas(
    steps: int,
    *,
    shift: float = 1.0,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    sigma_min: float | None = None,
) -> torch.Tensor:
    """float64 ``[steps + 1]`` noise levels from 1 down to 0.

    ``steps`` points are spaced linearly in unshifted t from 1 to ``sigma_min`` and then shifted, then 0 is
    appended. The default ``sigma_min`` is diffusers' (the shifted ``1 / num_train_timesteps``), so the
    last model call happens at the same noise level as in the published pipeline.
    """
    if steps < 1:
        raise ValueError(f"expected at least one step, got {steps}")
    if sigma_min is None:
        sigma_min = float(shift_timesteps(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64), shift))
    if not 0 <= sigma_min < 1:
        raise ValueError(f"expected sigma_min in [0, 1), got {sigma_min}")
    t = torch.linspace(1.0, sigma_min, steps, dtype=torch.float64)
    return torch.cat([shift_timesteps(t, shift), t.new_zeros(1)])


def _cat2(a: Any, b: Any) -> Any:
    """Concatenate two batches of the same kind along the batch axis."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b], 0)
    if isinstance(a, SparseTensor):
        return SparseTensor.cat([a, b])
    if isinstance(a, Mapping):
        return {k: _cat2(a[k], b[k]) for k in a}
    if a is None:
        return None
    cat = getattr(type(a), "cat", None)
    if cat is None:
        raise TypeError(f"cannot batch conditions of type {type(a).__name__}: expected a Tensor, SparseTensor, "
                        "dict of those, or a type with a classmethod cat([a, b])")
    return cat([a, b])


def _halves(v: Latent, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a doubled-batch prediction of ``2n`` rows into its (cond, uncond) feature halves."""
    f = v.feats if isinstance(v, SparseTensor) else v
    if f.shape[0] != 2 * n:
        raise ValueError(f"expected the guided prediction to have {2 * n} rows, got {f.shape[0]}")
    return f[:n], f[n:]


def _batch_size(x: Latent) -> int:
    return x.batch_size if isinstance(x, SparseTensor) else x.shape[0]


def _prepared(model: ModelFn, cond: Any) -> Any:
    """``model.prepare_condition(cond)`` when the model has it (work on a constant condition done once)."""
    prepare = getattr(model, "prepare_condition", None)
    return prepare(cond) if callable(prepare) and cond is not None else cond


@torch.no_grad()
def sample_euler(
    model: ModelFn,
    noise: Latent,
    *,
    steps: int,
    cond: Any = None,
    uncond: Any = None,
    guidance_scale: float = 1.0,
    shift: float = 1.0,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    sigma_min: float | None = None,
    progress: bool = False,
    desc: str = "sampling",
    cuda_graph: bool | None = None,
) -> Latent:
    """Integrate the flow ODE from ``noise`` (sigma = 1) to data (sigma = 0) with Euler steps.

    Args:
        model: ``model(x, t, cond) -> v`` with ``t`` float32 ``[B]`` on the 0..num_train_timesteps scale and
            ``v`` of the same kind and shape as ``x`` (dense ``[B, ...]`` or a SparseTensor).
        noise: the starting sample (dense ``[B, ...]`` or SparseTensor). Make it with
            :func:`d3s2.flow.training.randn_like_latent` and a seeded generator for reproducible results.
        cond / uncond: conditions for the model (Tensor, SparseTensor, dict, or a type with ``cat``). With
            ``guidance_scale != 1`` both are required and the two passes run as one batched forward.
        guidance_scale: classifier-free guidance scale s; ``v = v_u + s·(v_c - v_u)``.
        shift, num_train_timesteps, sigma_min: the schedule (:func:`euler_sigmas`).
        progress: show a tqdm bar.
        cuda_graph: replay the model call from a CUDA graph after the first step (CUDA only; default
            ``$D3S2_CUDA_GRAPHS``, on). The model must not synchronise with the host after its first call;
            when the capture fails, sampling goes on eagerly (one warning per model type).

    Returns the sample at sigma = 0 with the same kind, shape and dtype as ``noise``; the state is kept in
    float32 between steps.
    """
    guided = guidance_scale != 1.0
    if guided and uncond is None:
        raise ValueError("guidance_scale != 1 needs an unconditional condition (uncond)")
    sigmas = euler_sigmas(steps, shift=shift, num_train_timesteps=num_train_timesteps, sigma_min=sigma_min)
    sparse = isinstance(noise, SparseTensor)
    state = (noise.feats if sparse else noise).float().clone()
    b, n = _batch_size(noise), state.shape[0]
    device = state.device
    # The doubled batch's coordinates never change: build it once so that its structure cache (SSA layouts,
    # block sorts, window partitions, padding plans) is built on the first step and reused by every later one.
    pair = SparseTensor.cat([noise, noise]) if guided and sparse else None
    both = _prepared(model, _cat2(cond, uncond)) if guided else None
    single = None if guided else _prepared(model, cond)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """float32 velocity for latent features / batch ``x`` (noise's dtype) at model times ``t [b]``."""
        if guided:
            xx = torch.cat([x, x], 0)
            v_c, v_u = _halves(model(pair.replace(xx) if sparse else xx, torch.cat([t, t]), both), n)
            return v_u.float() + guidance_scale * (v_c.float() - v_u.float())
        out = model(noise.replace(x) if sparse else x, t, single)
        return (out.feats if isinstance(out, SparseTensor) else out).float()

    step = GraphedStep(velocity, enabled=use_cuda_graphs(device, cuda_graph), name=type(model).__name__)
    for i in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        t = torch.full((b,), float(sigmas[i]) * num_train_timesteps, dtype=torch.float32, device=device)
        vel = step(state.to(noise.dtype), t)
        if vel.shape != state.shape:
            raise ValueError(f"expected a velocity of shape {tuple(state.shape)}, got {tuple(vel.shape)}")
        state = state + float(sigmas[i + 1] - sigmas[i]) * vel
    out_feats = state.to(noise.dtype)
    return noise.replace(out_feats) if sparse else out_feats

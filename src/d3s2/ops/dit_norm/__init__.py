"""Fused normalisations of the DiT block for inference (no autograd): residual + LayerNorm + adaLN modulation,
and the multi-head QK RMS norm in place in the fused qkv output.

Backends, chosen per call (``backend=`` → ``use_backend("dit_norm", ...)`` → ``D3S2_DIT_NORM_BACKEND`` → auto):
``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``; fp16/bf16/fp32) and ``torch`` (the reference, any device
and dtype). The kernels have no backward: these functions refuse inputs that require grad while grad mode is
on, and the model keeps its autograd path for training. Semantics and shapes:
:mod:`d3s2.ops.dit_norm.reference`.
"""

from __future__ import annotations

import torch

from .._backend import needs_float_dtype, needs_triton, op_backends
from .reference import Sample, add_norm_ref, qk_rms_norm_ref_

BACKENDS = op_backends("dit_norm")


MAX_CHANNELS = 16384  # the triton add_norm keeps a whole row in one program (single-pass statistics)


def _fits_one_program(x: torch.Tensor, *_: torch.Tensor) -> str | None:
    return None if x.shape[-1] <= MAX_CHANNELS else f"last dim {x.shape[-1]} > {MAX_CHANNELS}"


BACKENDS.register("triton", needs_triton, needs_float_dtype(torch.float16, torch.bfloat16, torch.float32),
                  _fits_one_program)
BACKENDS.register("torch")


def no_autograd(*tensors: torch.Tensor | None) -> bool:
    """True when nothing would record a graph: grad mode off, or no tensor requiring grad."""
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def _check_rows(name: str, v: torch.Tensor | None, c: int, dtype_ref: torch.Tensor) -> None:
    if v is None:
        return
    if v.ndim != 2 or v.shape[1] != c or v.stride(1) != 1:
        raise ValueError(f"expected {name} of shape [B, {c}] with contiguous channels, got {tuple(v.shape)} "
                         f"strides {v.stride()}")
    if v.device != dtype_ref.device:
        raise ValueError(f"expected {name} on {dtype_ref.device}, got {v.device}")


def add_norm(x: torch.Tensor, update: torch.Tensor | None = None, gate: torch.Tensor | None = None, *,
             weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
             shift: torch.Tensor | None = None, scale: torch.Tensor | None = None, eps: float = 1e-6,
             normalize: bool = True, sample: Sample = None,
             backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``r = x + gate[s]·update``; ``y = LN(r)·weight + bias``, then ``y·(1 + scale[s]) + shift[s]``.

    x, update ``[M, C]`` (rows may be strided, channels contiguous); gate, shift, scale ``[B, C]`` (e.g. chunks of
    the adaLN modulation ``[B, 6C]``); weight, bias ``[C]``; ``sample`` maps token rows to samples: rows per
    sample (int; M = B·rows, dense or equal-length tokens) or an int sample index ``[M]`` (ragged tokens); None
    when B = 1. Returns ``(r, y)`` in x's dtype (r is x itself without an update; y None without normalize).
    See :func:`~d3s2.ops.dit_norm.reference.add_norm_ref`.
    """
    if x.ndim != 2 or x.stride(-1) != 1:
        raise ValueError(f"expected x of shape [M, C] with contiguous channels, got {tuple(x.shape)}")
    m, c = x.shape
    if update is not None and (update.shape != x.shape or update.stride(-1) != 1):
        raise ValueError(f"expected update of shape {tuple(x.shape)} with contiguous channels, got "
                         f"{tuple(update.shape)}")
    if gate is not None and update is None:
        raise ValueError("a gate needs an update")
    if (shift is None) != (scale is None):
        raise ValueError("expected both shift and scale, or neither")
    if (weight is None) != (bias is None):
        raise ValueError("expected both weight and bias, or neither")
    for name, v in (("gate", gate), ("shift", shift), ("scale", scale)):
        _check_rows(name, v, c, x)
    for name, v in (("weight", weight), ("bias", bias)):
        if v is not None and v.shape != (c,):
            raise ValueError(f"expected {name} of shape [{c}], got {tuple(v.shape)}")
    rows = [v for v in (gate, shift, scale) if v is not None]
    b = rows[0].shape[0] if rows else 1
    if isinstance(sample, torch.Tensor):
        if sample.shape != (m,) or sample.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"expected an int sample index of shape [{m}], got {tuple(sample.shape)} {sample.dtype}")
    elif isinstance(sample, int):
        if sample < 0 or m != b * sample:
            raise ValueError(f"expected {b} samples × {sample} rows, got {m} rows")
    elif sample is None:
        if b != 1:
            raise ValueError(f"expected a sample map for {b} modulation rows")
    else:
        raise TypeError(f"expected sample int, tensor or None, got {type(sample).__name__}")
    if not no_autograd(x, update, gate, weight, bias, shift, scale):
        raise RuntimeError("add_norm is forward-only: call it with grad mode off or on tensors without grad")
    if m == 0:  # no rows (e.g. samples without tokens): nothing to compute, whatever the sample map
        return (x if update is None else torch.empty_like(x)), (torch.empty_like(x) if normalize else None)
    name = BACKENDS.resolve(backend, *(t for t in (x, update, gate, weight, bias, shift, scale) if t is not None))
    if name == "torch":
        return add_norm_ref(x, update, gate, weight=weight, bias=bias, shift=shift, scale=scale, eps=eps,
                            normalize=normalize, sample=sample)
    if name == "triton":
        from .triton import add_norm_triton  # lazy: triton is imported only when this backend runs

        index = sample if isinstance(sample, torch.Tensor) else None
        per = sample if isinstance(sample, int) else 1
        if weight is not None:
            weight, bias = weight.contiguous(), bias.contiguous()
        return add_norm_triton(x, update, gate, weight, bias, shift, scale, float(eps), normalize, per, index)
    raise AssertionError(f"unhandled dit_norm backend {name}")  # every registered backend is dispatched above


def qk_rms_norm_(qkv: torch.Tensor, q_gamma: torch.Tensor, k_gamma: torch.Tensor, *,
                 backend: str | None = None) -> torch.Tensor:
    """In place on the fused projection output ``qkv [..., P ≥ 2, H, D]``: per head,
    ``q ← q / ‖q‖ · √D · q_gamma[h]`` on part 0 and the same with ``k_gamma`` on part 1 (``γ [H, D]``).

    The leading dims must flatten to one token dim without a copy, D must be contiguous. Returns qkv, whose
    ``unbind(-3)`` then gives the normalised q, k and v as views. See :func:`qk_rms_norm_ref_`.
    """
    if qkv.ndim < 3 or qkv.shape[-3] < 2 or qkv.stride(-1) != 1:
        raise ValueError(f"expected qkv of shape [..., P >= 2, H, D] with contiguous D, got {tuple(qkv.shape)}")
    hd = tuple(qkv.shape[-2:])
    for name, g in (("q_gamma", q_gamma), ("k_gamma", k_gamma)):
        if tuple(g.shape) != hd:
            raise ValueError(f"expected {name} of shape {list(hd)}, got {tuple(g.shape)}")
    if not no_autograd(qkv, q_gamma, k_gamma):
        raise RuntimeError("qk_rms_norm_ is forward-only: call it with grad mode off or on tensors without grad")
    name = BACKENDS.resolve(backend, qkv, q_gamma, k_gamma)
    if name == "torch":
        return qk_rms_norm_ref_(qkv, q_gamma, k_gamma)
    if name == "triton":
        from .triton import qk_rms_norm_triton_

        flat = qkv.view(-1, *qkv.shape[-3:])  # raises when the token dims do not flatten without a copy
        qk_rms_norm_triton_(flat, q_gamma, k_gamma)
        return qkv
    raise AssertionError(f"unhandled dit_norm backend {name}")  # every registered backend is dispatched above


__all__ = ["add_norm", "qk_rms_norm_", "add_norm_ref", "qk_rms_norm_ref_", "no_autograd", "BACKENDS"]

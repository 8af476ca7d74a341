"""The DiT MLP's ``Linear → GELU(tanh)`` with the GELU in the GEMM epilogue, for inference (no autograd).

Backends, chosen per call (``backend=`` → ``use_backend("linear_gelu", ...)`` → ``D3S2_LINEAR_GELU_BACKEND`` →
auto): ``torch`` (the reference: a GEMM, then a GELU pass over the ``[M, 4C]`` hidden tensor) and ``cublaslt``
(``torch._addmm_activation``: cuBLASLt's GELU_BIAS epilogue, the tanh GELU applied to the float32 accumulator
before the single rounding, so the hidden tensor is written once and never re-read; CUDA only). There is no
Triton kernel: the fusion belongs to the vendor GEMM. Auto prefers ``torch`` until GPU measurements at the DiT
shapes (``benchmarks/bench_dit_norms.py``, rows ``ffn``) show the epilogue faster: cuBLASLt's heuristics may pick
a slower GEMM than the plain path. Semantics: :func:`~d3s2.ops.linear_gelu.reference.linear_gelu_ref`.
"""

from __future__ import annotations

import torch

from .._backend import needs_float_dtype, op_backends
from .reference import linear_gelu_ref

BACKENDS = op_backends("linear_gelu")


def _on_cuda(*tensors: torch.Tensor) -> str | None:
    # On the CPU, _addmm_activation computes the exact (erf) GELU, not the tanh one: refuse rather than differ.
    return None if all(t.is_cuda for t in tensors) else "the cuBLASLt epilogue needs CUDA tensors"


def _no_grad(*tensors: torch.Tensor) -> str | None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "forward-only: grad mode is on and an input requires grad"
    return None


BACKENDS.register("torch")
BACKENDS.register("cublaslt", _on_cuda, _no_grad, needs_float_dtype(torch.float16, torch.bfloat16, torch.float32))


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                backend: str | None = None) -> torch.Tensor:
    """``GELU_tanh(x·Wᵀ + b)``: ``x [..., C]``, ``weight [F, C]``, ``bias [F]`` → ``[..., F]`` in x's dtype."""
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1] or bias.shape != (weight.shape[0],):
        raise ValueError(f"expected x [..., C], weight [F, C], bias [F]; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(bias.shape)}")
    name = BACKENDS.resolve(backend, x, weight, bias)
    if name == "torch":
        return linear_gelu_ref(x, weight, bias)
    if name == "cublaslt":
        out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], weight.shape[0])
    raise AssertionError(f"unhandled linear_gelu backend {name}")  # every registered backend is dispatched above


__all__ = ["linear_gelu", "linear_gelu_ref", "BACKENDS"]

"""Pure-torch reference (the spec) of the fused DiT-block normalisations, inference only.

``add_norm_ref``: the residual update and the LayerNorm that follows it in the adaLN block,

    r = x + gate[s]·u          (or x + u without a gate, or x without an update)
    y = LN(r)·w + b            (float32 statistics; no affine without w / b)
    y = y·(1 + scale[s]) + shift[s]   (adaLN modulation, when given)

with the modulation rows of token m taken from sample ``s = m // rows_per_sample`` (dense ``[B, T, C]`` tokens
or equal-length samples) or ``s = sample_index[m]`` (ragged sparse tokens). The operations and their roundings
are those of :class:`d3s2.models.dit.blocks.ModulatedCrossBlock`'s torch path, so on the CPU this reference
gives the same numbers as that path.

``qk_rms_norm_ref_``: the multi-head QK RMS norm applied in place to the q and k parts of a fused qkv
projection output, ``q ← q / ‖q‖ · √D · γ_q`` per head (likewise k).

Dimension legend: M token rows, C channels, B samples, H heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A token → sample map: rows per sample (an int, samples of equal length) or a sample index per row ``[M]``.
Sample = int | torch.Tensor | None


def _layer_norm32(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with float32 statistics, in ``x``'s dtype (as ``blocks.layer_norm32``)."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and all(
            p is None or p.dtype == x.dtype for p in (weight, bias)):
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], w, b, eps).to(x.dtype)


def _per_row(v: torch.Tensor, sample: Sample, m: int) -> torch.Tensor:
    """Modulation rows ``v [B, C]`` broadcast to the token rows: ``[B, 1, C]`` (int sample) or ``[M, C]``."""
    if isinstance(sample, torch.Tensor):
        return v.index_select(0, sample)
    if sample is None:
        return v  # one sample: [1, C] broadcasts over the rows
    return v[:, None, :]


def add_norm_ref(x: torch.Tensor, update: torch.Tensor | None = None, gate: torch.Tensor | None = None, *,
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 shift: torch.Tensor | None = None, scale: torch.Tensor | None = None, eps: float = 1e-6,
                 normalize: bool = True, sample: Sample = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Residual update then (modulated) LayerNorm; see the module docstring.

    x, update ``[M, C]``; gate, shift, scale ``[B, C]`` (row ``s`` for the tokens of sample s); weight, bias
    ``[C]``; ``sample``: rows per sample (int, M = B·rows) or an int64 sample index ``[M]``; None when B = 1.
    Returns ``(r [M, C], y [M, C] or None without normalize)``, both in x's dtype (r is x when update is None).
    """
    m, c = x.shape
    grouped = isinstance(sample, int)
    view = (lambda t: t.reshape(-1, sample, c)) if grouped else (lambda t: t)  # noqa: E731
    r = x
    if update is not None:
        if gate is None:
            r = x + update
        else:
            r = torch.addcmul(view(x), _per_row(gate, sample, m), view(update)).reshape(m, c)
    if not normalize:
        return r, None
    y = _layer_norm32(r, weight, bias, eps)
    if shift is not None or scale is not None:
        if shift is None or scale is None:
            raise ValueError("expected both shift and scale, or neither")
        y = torch.addcmul(_per_row(shift, sample, m), view(y), 1 + _per_row(scale, sample, m)).reshape(m, c)
    return r, y


def qk_rms_norm_ref_(qkv: torch.Tensor, q_gamma: torch.Tensor, k_gamma: torch.Tensor) -> torch.Tensor:
    """Normalise ``qkv[..., 0, :, :]`` (q) and ``qkv[..., 1, :, :]`` (k) of ``qkv [..., P ≥ 2, H, D]`` in place.

    Each head's D-vector v becomes ``v / max(‖v‖, 1e-12) · √D · γ[h]`` (``γ [H, D]``), computed in float32 and
    rounded once to qkv's dtype (as :class:`d3s2.models.dit.blocks.MultiHeadRMSNorm`). Returns qkv.
    """
    acc = torch.promote_types(qkv.dtype, torch.float32)
    scale = qkv.shape[-1] ** 0.5
    for part, gamma in ((0, q_gamma), (1, k_gamma)):
        v = qkv.select(-3, part)
        inv = scale / torch.linalg.vector_norm(v, dim=-1, keepdim=True, dtype=acc).clamp_min(1e-12)
        v.copy_((v * inv).mul_(gamma.to(acc)))
    return qkv

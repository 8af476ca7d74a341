"""Semi-amortised encoding: the SS-VAE encoder's latent refined against the decoder's loss on the input itself.

The encoder is amortised: one forward pass guesses the latent of any shape, and it finds less than the decoder can
express (a latent optimised directly against a shape's targets reconstructs it far better, see
``benchmarks/diagnose_vae_latent.py``). At encode time the target SDF is known (it is the encoder's input), so
:func:`refine_latent` starts from the posterior mode and takes Adam steps on the latent features alone, decoder
frozen, to lower the training's decoder terms ``λ_in L_in + λ_ext L_ext + λ_sharp L_sharp`` (eq. 3 without the
KL, :mod:`d3s2.models.vae.losses`) on that shape's own targets: the DeepSDF-style auto-decoding step used as an
encoder. Each sample keeps its best latent by that loss, so the result is never worse than the start by it.

Cost: every step decodes the whole shape and back-propagates to the latent only (no weight gradients), so ``N``
steps cost about ``N`` decoder forward+backward passes; the decoder's weights and the encoder are not touched.

Dimension legend: NL latent voxels, Z latent channels, M' decoded voxels (512 per latent voxel), B samples.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ... import sparse as sp
from ...ops.conv.reference import lookup
from .losses import SDFLossWeights
from .sparse_sdf_vae import SparseSDFBatch, SparseSDFVAE

__all__ = ["RefinedLatent", "refine_latent", "DecoderTargets"]


@dataclass
class RefinedLatent:
    """What :func:`refine_latent` returns.

    Attributes:
        latent: ``[NL, Z]`` the best latent of each sample (coords, layout and cache of the input latent).
        losses: float32 ``[steps + 1, B]`` each sample's loss at each step (row 0: the start latent's).
        best_step: int64 ``[B]`` the step whose latent each sample kept (0: the start).
    """

    latent: sp.SparseTensor
    losses: torch.Tensor
    best_step: torch.Tensor


class DecoderTargets:
    """The targets of the decoded voxels, aligned once with the decoder's output rows (the same every step).

    Args:
        decoded: ``[M', 1]`` a decoder output (only its coords and batch layout are used).
        batch: the full batch whose ``target`` / ``in_band`` / ``sharp`` the loss compares with.
    """

    def __init__(self, decoded: sp.SparseTensor, batch: SparseSDFBatch) -> None:
        target = batch.target
        if decoded.resolution != target.resolution:
            raise ValueError(f"decoded resolution {decoded.resolution} != target resolution {target.resolution}")
        row = lookup(target.coords, decoded.coords, target.resolution).long()  # [M'] target row or -1
        found = row >= 0
        safe = row.clamp(min=0)
        self.values = target.feats[safe, 0].float()  # [M']
        self.found = found.float()
        self.band = (batch.in_band[safe] & found).float()
        self.ext = (~batch.in_band[safe] & found).float()
        self.sharp = (batch.sharp[safe] & found).float()
        self.batch_index = decoded.batch_index
        self.batch_size = decoded.batch_size

    def _mean(self, err2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-sample mean of ``err2`` over ``mask`` ``[B]`` (0 for an empty set, as ``losses._masked_mse``)."""
        zeros = err2.new_zeros(self.batch_size)
        total = zeros.index_add(0, self.batch_index, err2 * mask)
        count = zeros.index_add(0, self.batch_index, mask)
        return total / count.clamp(min=1)

    def loss(self, decoded: sp.SparseTensor, weights: SDFLossWeights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample ``λ_in L_in + λ_ext L_ext + λ_sharp L_sharp``: fp32 ``[B]`` and its terms (each ``[B]``).

        For one sample this equals :func:`~d3s2.models.vae.losses.sparse_sdf_loss` without its KL term; summed over
        samples, each sample's latent gets exactly its own gradient.
        """
        err2 = (decoded.feats[:, 0].float() - self.values).pow(2) * self.found  # [M']
        terms = {"l_in": self._mean(err2, self.band), "l_ext": self._mean(err2, self.ext),
                 "l_sharp": self._mean(err2, self.sharp)}
        loss = weights.in_band * terms["l_in"] + weights.ext * terms["l_ext"] + weights.sharp * terms["l_sharp"]
        return loss, terms


@contextlib.contextmanager
def _frozen(model: torch.nn.Module):
    """The model in eval mode with no parameter requiring grad; its mode and flags restored after."""
    training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(training)


def check_refine_settings(steps: int, lr: float) -> None:
    """Refinement settings no run can use (ValueError), checked before the long work that precedes the refinement;
    ``lr`` only matters when ``steps`` > 0."""
    if steps < 0:
        raise ValueError(f"expected refine_steps >= 0 (--refine-steps), got {steps}")
    if steps and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"expected a finite refine_lr > 0 (--refine-lr), got {lr}")


def refine_latent(
    model: SparseSDFVAE,
    batch: SparseSDFBatch,
    z: sp.SparseTensor,
    *,
    steps: int,
    lr: float = 0.03,
    weights: SDFLossWeights | None = None,
    anchor: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> RefinedLatent:
    """Adam on the latent features of ``z`` against the decoder's loss on ``batch``'s own targets.

    Nothing is sampled: the result is a function of the inputs (bit for bit on CPU; on CUDA up to the order of
    the kernels' atomic adds). The model is put in eval mode with no parameter requiring grad for the call
    (both restored after; no parameter gets a ``.grad``).
    The whole shape is decoded at once: a chunked decode (R > 512) is not supported here.

    Args:
        model: the SS-VAE (only its decoder runs).
        batch: the full batch of ``z``'s samples (:meth:`PackedSDFBatch.to` / ``unpack``): ``target`` ``[M, 1]``
            SDF / τ of every voxel of the occupied blocks, ``in_band`` / ``sharp`` bool ``[M]``.
        z: ``[NL, Z]`` start latent at R/8, e.g. the posterior mode of ``model.encode(batch.sdf, ...)``.
        steps: Adam steps (0: ``z`` itself is returned, after one decode for its loss).
        lr: Adam learning rate on the latent.
        weights: the λs (default: the model's training loss weights; the KL weight is not used).
        anchor: weight of each sample's mean ``(z' - z)²`` added to its loss: keeps refined latents near the
            encoder's (the distribution a DiT learns from); 0 = none.
        autocast_dtype: decode under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16`` on CUDA, as
            ``d3s2 data encode`` encodes); None = the model's own precision.
        progress: a tqdm bar over the steps.
    Returns:
        :class:`RefinedLatent`: the best latent of each sample by the loss, the loss curve, the kept step.
    """
    if steps < 0:
        raise ValueError(f"expected steps >= 0, got {steps}")
    if lr <= 0:
        raise ValueError(f"expected lr > 0, got {lr}")
    if anchor < 0:
        raise ValueError(f"expected anchor >= 0, got {anchor}")
    if z.resolution * 8 != batch.target.resolution or z.batch_size != batch.target.batch_size:
        raise ValueError(f"expected a latent at resolution {batch.target.resolution // 8} with "
                         f"{batch.target.batch_size} samples, got {z.resolution} with {z.batch_size}")
    weights = weights or model.config.loss
    start = z.feats.detach().float()
    feats = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([feats], lr=lr)
    best = start.clone()
    best_loss = torch.full((z.batch_size,), float("inf"), device=start.device)
    best_step = torch.zeros(z.batch_size, dtype=torch.long, device=start.device)
    bidx = z.batch_index
    anchor_count = z.batch_counts.to(start.device).float().clamp(min=1) * z.num_channels  # [B] latent entries
    targets: DecoderTargets | None = None
    history = []
    amp = (functools.partial(torch.autocast, start.device.type, dtype=autocast_dtype) if autocast_dtype
           else contextlib.nullcontext)
    # The bar counts the Adam steps: the scoring decode after the last one is not a step (it ends at N/N).
    bar = tqdm(total=steps, desc="refine", unit="step", disable=not progress or steps == 0)
    with _frozen(model), bar:
        for step in range(steps + 1):
            last = step == steps
            # The last step only scores the latent the last update made.
            with torch.set_grad_enabled(not last), amp():
                decoded = model.decode(z.replace(feats))
            with torch.set_grad_enabled(not last):
                if targets is None:
                    targets = DecoderTargets(decoded, batch)
                loss, _ = targets.loss(decoded, weights)
                if anchor:
                    shift = (feats - start).pow(2).sum(1)  # [NL]
                    loss = loss + anchor * torch.zeros_like(loss).index_add(0, bidx, shift) / anchor_count
            value = loss.detach()
            history.append(value)
            better = value < best_loss  # strict: ties keep the earlier latent
            best_loss = torch.where(better, value, best_loss)
            best_step = torch.where(better, torch.full_like(best_step, step), best_step)
            best = torch.where(better[bidx][:, None], feats.detach(), best)
            if last:
                break
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()  # samples are independent: each latent gets its own loss's gradient
            opt.step()
            bar.update()
    latent = z if steps == 0 else z.replace(best.to(z.feats.dtype))
    return RefinedLatent(latent, torch.stack(history), best_step)

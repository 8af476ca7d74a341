"""The condition tokens that the DiTs cross-attend to.

Dimension legend: B batch, L tokens per sample (padded), C channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ConditionTokens:
    """A batch of image-condition tokens, optionally ragged (sparse conditioning).

    Attributes:
        tokens: ``[B, L, C]`` features; rows past a sample's length are padding.
        mask: bool ``[B, L]``, True on real tokens; None means every token is real (dense conditioning).
        coords: int ``[B, L, 3]`` token positions for the condition position encoding (sparse conditioning:
            patch ``(col, row, 0)``, cls/register ``(0, 0, 1)``); None for dense conditioning.
    """

    tokens: torch.Tensor
    mask: torch.Tensor | None = None
    coords: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3:
            raise ValueError(f"expected condition tokens of shape [B, L, C], got {tuple(self.tokens.shape)}")
        b, l = self.tokens.shape[:2]
        if self.mask is not None and (self.mask.shape != (b, l) or self.mask.dtype != torch.bool):
            raise ValueError(f"expected a bool mask of shape [{b}, {l}], got {self.mask.dtype} "
                             f"{tuple(self.mask.shape)}")
        if self.coords is not None and self.coords.shape != (b, l, 3):
            raise ValueError(f"expected coords of shape [{b}, {l}, 3], got {tuple(self.coords.shape)}")

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @classmethod
    def cat(cls, items: Sequence[ConditionTokens]) -> ConditionTokens:
        """Concatenate along the batch, padding every item to the longest token count."""
        if not items:
            raise ValueError("expected at least one ConditionTokens")
        if len({(c.mask is None, c.coords is None) for c in items}) != 1:
            raise ValueError("cannot concatenate dense and sparse conditions")
        l = max(c.tokens.shape[1] for c in items)
        padded = [c._padded(l) for c in items]
        first = padded[0]
        mask = None if first.mask is None else torch.cat([c.mask for c in padded])
        coords = None if first.coords is None else torch.cat([c.coords for c in padded])
        return cls(torch.cat([c.tokens for c in padded]), mask, coords)

    def _padded(self, length: int) -> ConditionTokens:
        extra = length - self.tokens.shape[1]
        if extra == 0:
            return self
        if self.mask is None:
            raise ValueError("dense conditions must have equal token counts to be batched, got "
                             f"{self.tokens.shape[1]} and {length}")
        b, _, c = self.tokens.shape
        tokens = torch.cat([self.tokens, self.tokens.new_zeros(b, extra, c)], 1)
        mask = torch.cat([self.mask, self.mask.new_zeros(b, extra)], 1)
        coords = None if self.coords is None else torch.cat([self.coords, self.coords.new_zeros(b, extra, 3)], 1)
        return ConditionTokens(tokens, mask, coords)

    def zeros_like(self) -> ConditionTokens:
        """The unconditional input of the published models: zero tokens with the same mask and coords."""
        return ConditionTokens(torch.zeros_like(self.tokens), self.mask, self.coords)

    def drop(self, dropped: torch.Tensor) -> ConditionTokens:
        """Zero the tokens of samples where ``dropped [B]`` is True (condition dropout for CFG training)."""
        if dropped.shape != (self.batch_size,):
            raise ValueError(f"expected dropped of shape [{self.batch_size}], got {tuple(dropped.shape)}")
        keep = (~dropped.to(device=self.tokens.device, dtype=torch.bool)).to(self.tokens.dtype)
        return ConditionTokens(self.tokens * keep[:, None, None], self.mask, self.coords)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ConditionTokens:
        """Move everything to ``device``; ``dtype`` applies to the tokens only."""
        def mv(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device)
        return ConditionTokens(self.tokens.to(device=device, dtype=dtype), mv(self.mask), mv(self.coords))


@dataclass(frozen=True)
class PreparedCondition:
    """A condition with the work that depends only on it done once, for a DiT that sees it at every sampling
    step: the embedded tokens and every block's cross-attention keys/values. Made by the DiTs'
    ``prepare_condition``; valid for that model (``owner``) while its weights do not change.

    Attributes:
        cond: the tokens as the blocks see them (the model's dtype, condition embedding applied).
        kv: per block ``[B, L, 2, H, D]`` cross-attention keys (``[:, :, 0]``) and values.
        owner: ``id()`` of the model that prepared it.
        constant: per sample, whether all its tokens are equal (and unmasked), like the zero tokens of the CFG
            unconditional pass: its cross-attention output is then the value row, with no attention to run.
    """

    cond: ConditionTokens
    kv: tuple[torch.Tensor, ...]
    owner: int
    constant: tuple[bool, ...]

    @classmethod
    def build(cls, model: nn.Module, cond: torch.Tensor | ConditionTokens) -> PreparedCondition:
        """For the DiT ``model``: ``cond`` embedded (``model.embed_condition``) and every block's cross-attention
        keys/values; finds the constant samples (one host sync)."""
        cond = model.embed_condition(cond)
        kv = tuple(b.cross_attn.project_kv(cond, model.dtype) for b in model.blocks)
        t = cond.tokens
        same = (t == t[:, :1]).flatten(1).all(1)  # [B]
        if cond.mask is not None:
            same &= cond.mask.all(1)
        return cls(cond, kv, id(model), tuple(bool(s) for s in same.tolist()))

    @property
    def batch_size(self) -> int:
        return self.cond.batch_size


def unpack_condition(model: nn.Module, cond: torch.Tensor | ConditionTokens | PreparedCondition, batch_size: int
                     ) -> tuple[ConditionTokens, tuple[torch.Tensor | None, ...], tuple[bool, ...] | None]:
    """The ``cond`` argument of a DiT's forward as its blocks take it: ``(tokens, per-block kv, constant)``.

    Plain tokens are embedded by ``model.embed_condition`` (kv None: each block projects them; constant None); a
    :class:`PreparedCondition` must come from ``model.prepare_condition``. Tokens must be ``[batch_size, L, Cc]``.
    """
    n = len(model.blocks)
    if isinstance(cond, PreparedCondition):
        if cond.owner != id(model) or len(cond.kv) != n:
            raise ValueError(f"this PreparedCondition was made by another model (expected one from "
                             f"{type(model).__name__}.prepare_condition with {n} blocks)")
        tokens, kvs, constant = cond.cond, cond.kv, cond.constant
    else:
        tokens, kvs, constant = model.embed_condition(cond), (None,) * n, None
    cc = model.config.cond_channels
    if tokens.batch_size != batch_size or tokens.tokens.shape[-1] != cc:
        raise ValueError(f"expected condition tokens [{batch_size}, L, {cc}], got {tuple(tokens.tokens.shape)}")
    return tokens, kvs, constant


def as_condition(cond: torch.Tensor | ConditionTokens) -> ConditionTokens:
    """Accept a plain ``[B, L, C]`` tensor as dense conditioning."""
    return cond if isinstance(cond, ConditionTokens) else ConditionTokens(cond)

"""Per-call backend selection for numerics-critical ops.

Order of precedence, resolved on every call (never frozen at import):
    1. the ``backend=`` argument of the op,
    2. the innermost ``use_backend(op, name)`` context manager,
    3. the ``D3S2_<OP>_BACKEND`` environment variable (e.g. ``D3S2_CONV_BACKEND=torch``),
    4. ``auto``: the first registered backend (in preference order) whose constraints accept the inputs.

An explicit request whose constraints fail raises ``BackendUnavailableError`` saying why; ``auto`` skips
such backends silently (logged once at DEBUG level).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

AUTO = "auto"

# A constraint gets the op's tensors and returns None if it accepts them, else a human-readable reason.
Constraint = Callable[..., "str | None"]


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs."""


@dataclass
class _BackendEntry:
    name: str
    constraints: list[Constraint]


@dataclass
class OpBackends:
    """The backends of one op, in auto-preference order (fastest first)."""

    op: str
    entries: list[_BackendEntry] = field(default_factory=list)

    @property
    def env_var(self) -> str:
        return f"D3S2_{self.op.upper()}_BACKEND"

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def register(self, name: str, *constraints: Constraint) -> None:
        if name in self.names:
            raise ValueError(f"backend {name!r} already registered for op {self.op!r}")
        self.entries.append(_BackendEntry(name, list(constraints)))

    def _reasons(self, entry: _BackendEntry, tensors: tuple[torch.Tensor, ...], auto: bool = False) -> list[str]:
        # A constraint may carry a stricter ``auto_check`` that applies only when nobody asked for the backend.
        checks = list(entry.constraints)
        if auto:
            checks += [a for c in entry.constraints if (a := getattr(c, "auto_check", None)) is not None]
        return [r for c in checks if (r := c(*tensors)) is not None]

    def resolve(self, backend: str | None, *tensors: torch.Tensor) -> str:
        """Return the backend name to use for these input tensors."""
        requested = backend or _context_choice(self.op) or os.environ.get(self.env_var) or AUTO
        requested = requested.lower()
        if requested == AUTO:
            for entry in self.entries:
                reasons = self._reasons(entry, tensors, auto=True)
                if not reasons:
                    return entry.name
                _log_skip_once(self.op, entry.name, "; ".join(reasons))
            raise BackendUnavailableError(f"no backend of op {self.op!r} accepts these inputs")
        entry = next((e for e in self.entries if e.name == requested), None)
        if entry is None:
            raise BackendUnavailableError(
                f"unknown backend {requested!r} for op {self.op!r}; expected one of {self.names} or 'auto' "
                f"(set by argument, use_backend() or {self.env_var})"
            )
        reasons = self._reasons(entry, tensors)
        if reasons:
            raise BackendUnavailableError(
                f"backend {requested!r} of op {self.op!r} cannot run these inputs: {'; '.join(reasons)}"
            )
        return requested


_REGISTRY: dict[str, OpBackends] = {}
_CONTEXT: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("d3s2_backends", default=None)


def op_backends(op: str) -> OpBackends:
    """The (created on first use) backend table of ``op``."""
    return _REGISTRY.setdefault(op, OpBackends(op))


def registered_ops() -> dict[str, OpBackends]:
    return dict(_REGISTRY)


def _context_choice(op: str) -> str | None:
    return (_CONTEXT.get() or {}).get(op)


@contextlib.contextmanager
def use_backend(op: str, name: str) -> Iterator[None]:
    """Force ``op`` to use backend ``name`` inside the block (``"auto"`` restores automatic choice)."""
    token = _CONTEXT.set({**(_CONTEXT.get() or {}), op: name})
    try:
        yield
    finally:
        _CONTEXT.reset(token)


@functools.cache
def _log_skip_once(op: str, name: str, reason: str) -> None:
    logger.debug("op %s: auto skips backend %s (%s)", op, name, reason)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True if triton can be imported (does not import it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Common constraints -----------------------------------------------------------------------------


def needs_triton(*tensors: torch.Tensor) -> str | None:
    if not triton_available():
        return "triton is not installed (pip install 'd3s2[triton]')"
    on_cuda = all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if not on_cuda and not triton_interpret():
        return "inputs are not on a CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on CPU)"
    return None


def _inputs_on_cuda(*tensors: torch.Tensor) -> str | None:
    if all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor)):
        return None
    return "auto uses Triton only for CUDA inputs (the interpreter is opt-in: pass backend='triton')"


# TRITON_INTERPRET=1 makes Triton runnable on CPU, but only an explicit request should get the (very slow)
# interpreter: otherwise one test module setting it would slow every later CPU test.
needs_triton.auto_check = _inputs_on_cuda  # type: ignore[attr-defined]


def needs_float_dtype(*dtypes: torch.dtype) -> Constraint:
    def check(*tensors: torch.Tensor) -> str | None:
        bad = [t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()
               and t.dtype not in dtypes]
        return f"dtype {bad[0]} not in {list(dtypes)}" if bad else None

    return check


def needs_head_dim_at_most(limit: int) -> Constraint:
    """Attention kernels: the last dim of the first tensor (q, ``[..., D]``) must be at most ``limit``."""
    def check(*tensors: torch.Tensor) -> str | None:
        d = tensors[0].shape[-1]
        return None if d <= limit else f"head dim {d} > {limit}"

    return check

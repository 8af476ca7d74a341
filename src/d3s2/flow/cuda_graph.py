"""Replaying a sampler's per-step model call from a CUDA graph.

A sampling stage calls the denoiser with the same shapes, token layout and condition at every step; only the
latent and the timestep change. On CUDA the step's launches (thousands of small kernels for a 24-block DiT)
cost host time that a CUDA graph removes: :class:`GraphedStep` runs the call eagerly once (that builds the
layout caches, the attention plans and compiles the Triton kernels, none of which may happen inside a
capture), then captures it with static input buffers and replays it for every later step.

On by default on CUDA; off with ``sample_euler(..., cuda_graph=False)`` or ``D3S2_CUDA_GRAPHS=0``. When a
capture fails (e.g. a model whose forward synchronises with the host), sampling goes on eagerly and a warning
is logged once per model type.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

ENV_VAR = "D3S2_CUDA_GRAPHS"
_OFF, _ON = ("0", "false", "off", "no"), ("", "1", "true", "on", "yes")
_FAILED: set[str] = set()  # model types whose capture failed once: they stay eager for this process


def use_cuda_graphs(device: torch.device, requested: bool | None = None) -> bool:
    """Whether a sampler on ``device`` replays its steps from a CUDA graph: never off CUDA; else ``requested``
    when given, else ``$D3S2_CUDA_GRAPHS`` (default on)."""
    if device.type != "cuda":
        return False
    if requested is not None:
        return bool(requested)
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value not in _OFF + _ON:
        raise ValueError(f"expected {ENV_VAR} to be one of {sorted(set(_OFF + _ON) - {''})}, got {value!r}")
    return value not in _OFF


class GraphedStep:
    """``fn(*tensors) -> tensor`` for a sampling loop, replayed from a CUDA graph after the first call.

    Call 1 runs eagerly. Call 2 copies its arguments into static buffers, runs ``fn`` on them on a side stream
    (the warm-up the CUDA-graph recipe asks for; its result is this call's result) and captures ``fn`` into a
    graph. Later calls copy the arguments into the buffers and replay. Arguments must keep their shapes and
    dtypes across calls; everything else ``fn`` reads (weights, conditions, caches) must stay alive and
    unchanged while this object is used. The returned tensor of a replay is the graph's static output: read it
    before the next call.

    Args:
        fn: the step's computation, free of host synchronisation after its first call.
        enabled: False runs every call eagerly (CPU, opt-out).
        name: the model type, for the once-per-type fallback warning.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], *, enabled: bool, name: str) -> None:
        self.fn = fn
        self.name = name
        self.enabled = enabled and name not in _FAILED
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._static: list[torch.Tensor] = []
        self._out: torch.Tensor | None = None

    @property
    def replaying(self) -> bool:
        """True once a graph has been captured."""
        return self.graph is not None

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if not self.enabled or self.calls == 1:
            return self.fn(*args)
        if self.graph is None:
            return self._capture(args)
        for buf, a in zip(self._static, args, strict=True):
            buf.copy_(a)
        self.graph.replay()
        return self._out

    def _capture(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        stream = torch.cuda.current_stream()
        self._static = [a.clone() for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(stream)
        # Warm-up outside the capture, on another stream (torch.cuda.graph docs), with host syncs made errors: a
        # step that syncs cannot be captured, and a capture that fails midway can leave the stream or the RNG
        # in capture mode for the rest of the process.
        previous_mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.stream(side):
                result = self.fn(*self._static)
            syncs = None
        except RuntimeError as err:
            syncs = err
        finally:
            torch.cuda.set_sync_debug_mode(previous_mode)
        stream.wait_stream(side)
        if syncs is not None:
            return self._fall_back(syncs, args)
        result.record_stream(stream)  # used on the main stream from here on
        graph = torch.cuda.CUDAGraph()
        try:
            # capture_begin/end directly: torch.cuda.graph's context would also synchronise and empty the
            # allocator's cache, which the next stage would then pay for in fresh cudaMallocs.
            with torch.cuda.stream(side):
                graph.capture_begin()
                try:
                    out = self.fn(*self._static)
                finally:
                    graph.capture_end()
        except RuntimeError as err:  # an uncapturable op inside fn
            self._disable(err)
            return result
        self.graph, self._out = graph, out
        return result

    def _fall_back(self, err: RuntimeError, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Disable graphs for this step function (a host sync in it) and run the step eagerly."""
        self._disable(err)
        return self.fn(*args)

    def _disable(self, err: RuntimeError) -> None:
        self.enabled = False
        self._static = []
        if self.name not in _FAILED:
            _FAILED.add(self.name)
            logger.warning("CUDA graph capture of %s failed, sampling eagerly: %s", self.name,
                           str(err).splitlines()[0] if str(err) else type(err).__name__)

"""Which model weights live on the accelerator when: stage-wise residency with prefetch on a side stream.

The pipeline's models run one after another (image encoder, dense DiT, dense VAE, sparse DiT, SS-VAE, ... per
stage), and at full size their weights alone take ~4 GiB in bf16 (each DiT ~1 GiB). :class:`WeightResidency`
keeps on the device only the model that runs now and the next ``lookahead`` models of the call's plan; the
others live in the host copy. A model's tensors (parameters and buffers) are packed into one flat buffer on
each side (page-locked on the host when CUDA is there), so bringing a model in is one host→device copy, issued
on a side CUDA stream while the current model computes; the main stream waits for it only when the model is
used. Sending a model out is free: the host copy is kept, the device buffer is dropped (copied back first only
when the weights were written while on the device).

Modes (``RESIDENCY``):

- ``"prefetch"`` (default on CUDA): the model in use plus the next ``lookahead`` of the plan; nothing stays on
  the device between calls.
- ``"resident"``: every model of the plan is on the device for the whole call and stays there (no copies
  after the first call; ~4 GiB more at the peak at full size).
- ``"low_vram"``: only the model in use, brought in when used (no prefetch), the allocator's cache emptied
  after each one leaves.

Models not in the plan (e.g. the 1024³ DiT during a 512³ call) go to the host in ``"prefetch"`` and
``"low_vram"`` modes. The host copy is taken on first use in the call's dtype and taken again when a model's
tensors were replaced from outside (``model.to(...)``, new parameters). :meth:`WeightResidency.release` gives
every model back its own independent tensors (e.g. before saving).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch._utils import _unflatten_dense_tensors

RESIDENCY = ("prefetch", "resident", "low_vram")
_ALIGN = 256  # bytes: every packed tensor starts on a boundary that vectorised kernels accept


class PackedWeights:
    """The parameters and buffers of one module packed into one flat byte buffer per location.

    ``home`` is the host buffer (page-locked when ``pin``); :meth:`load` makes a device buffer and points the
    module's tensors at views of it, :meth:`evict` points them back at the host views.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype, pin: bool) -> None:
        self.module = module
        self.dtype = dtype
        params: dict[int, nn.Parameter] = {}
        buffers: dict[int, list[tuple[nn.Module, str]]] = {}
        for m in module.modules():
            for p in m._parameters.values():
                if p is not None:
                    params.setdefault(id(p), p)
            for name, b in m._buffers.items():
                if b is not None:
                    buffers.setdefault(id(b), []).append((m, name))
        self.params = list(params.values())
        self.buffer_slots = list(buffers.values())
        current = self._tensors()
        # One region per storage dtype; in it every tensor is followed by a pad to the next _ALIGN boundary, so
        # all views of a region come from one C++ call (torch's unflatten) on [tensor, pad, tensor, pad, ...].
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(current):
            by_dtype.setdefault(dtype if t.is_floating_point() else t.dtype, []).append(i)
        self.groups: list[tuple[torch.dtype, int, int, list[torch.Tensor], list[int]]] = []
        offset = 0
        for dt, idx in by_dtype.items():
            per = _ALIGN // dt.itemsize
            templates = []
            for i in idx:
                n = current[i].numel()
                templates += [torch.empty(current[i].shape, dtype=dt, device="meta"),
                              torch.empty((-n) % per, dtype=dt, device="meta")]
            numel = sum(t.numel() for t in templates)
            self.groups.append((dt, offset, numel, templates, idx))
            offset += numel * dt.itemsize
        self.num_tensors = len(current)
        self.nbytes = offset
        self.home = torch.empty(max(offset, 1), dtype=torch.uint8, pin_memory=pin)
        self.home_views = self._views(self.home)
        for view, t in zip(self.home_views, current, strict=True):
            view.copy_(t)
        self.device_buf: torch.Tensor | None = None
        self.device_views: list[torch.Tensor] = []
        self.ready: torch.cuda.Event | None = None
        self._versions: list[int] = []
        self._assign(self.home_views)

    def _tensors(self) -> list[torch.Tensor]:
        return [p.data for p in self.params] + [m._buffers[n] for m, n in (s[0] for s in self.buffer_slots)]

    def _views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [buf] * self.num_tensors
        for dt, offset, numel, templates, idx in self.groups:
            flat = buf[offset: offset + numel * dt.itemsize].view(dt)
            for i, v in zip(idx, _unflatten_dense_tensors(flat, templates)[::2], strict=True):
                out[i] = v
        return out

    def _assign(self, views: Sequence[torch.Tensor]) -> None:
        n = len(self.params)
        for p, v in zip(self.params, views[:n], strict=True):
            p.data = v
        for slots, v in zip(self.buffer_slots, views[n:], strict=True):
            for m, name in slots:
                m._buffers[name] = v

    def _versions_now(self) -> list[int]:
        return [t._version for t in self.params] + [s[0][0]._buffers[s[0][1]]._version for s in self.buffer_slots]

    @property
    def device(self) -> torch.device | None:
        """Where the module's tensors are: the device of the device buffer, or None (host copy)."""
        return None if self.device_buf is None else self.device_buf.device

    def intact(self) -> bool:
        """Whether the module's tensors are still this object's views (False after ``module.to(...)`` etc.)."""
        views = self.home_views if self.device_buf is None else self.device_views
        current = self._tensors()
        return len(current) == len(views) and all(
            t.data_ptr() == v.data_ptr() and t.dtype == v.dtype and t.shape == v.shape
            for t, v in zip(current, views, strict=True))

    def load(self, device: torch.device, stream: torch.cuda.Stream | None) -> None:
        """Start bringing the weights to ``device`` (on ``stream`` when given, else now); :meth:`wait` before use."""
        if self.device_buf is not None:
            return
        # Allocated on the current stream, which uses and frees it; the side stream waits for the current
        # stream's queued work first, so it never writes into memory a queued kernel still reads.
        buf = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                buf.copy_(self.home[: self.nbytes], non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)
        else:
            buf.copy_(self.home[: self.nbytes])
            self.ready = None
        self.device_buf = buf
        self.device_views = self._views(buf)
        self._assign(self.device_views)
        self._versions = self._versions_now()

    def wait(self) -> None:
        """Make the current stream wait until the weights have arrived."""
        if self.ready is not None:
            torch.cuda.current_stream(self.device_buf.device).wait_event(self.ready)
            self.ready = None

    def evict(self) -> None:
        """Point the module back at the host copy (copied back first when written on the device)."""
        if self.device_buf is None:
            return
        self.wait()
        if self._versions_now() != self._versions:
            self.home[: self.nbytes].copy_(self.device_buf)
        self._assign(self.home_views)
        self.device_buf, self.device_views = None, []

    def release(self) -> None:
        """Give the module independent tensors again (its current location, one storage each)."""
        self.wait()
        self._assign([v.clone() for v in (self.home_views if self.device_buf is None else self.device_views)])
        self.device_buf, self.device_views = None, []


class WeightResidency:
    """Moves the pipeline's models between the host and the device along a call's plan.

    Use: :meth:`begin` with the call's plan (models in the order they run), :meth:`use` around each model's
    computation, :meth:`end` when the call is over.

    Args:
        lookahead: in ``"prefetch"`` mode, how many models after the one in use are brought in ahead.
    """

    def __init__(self, lookahead: int = 2) -> None:
        if lookahead < 0:
            raise ValueError(f"expected lookahead >= 0, got {lookahead}")
        self.lookahead = lookahead
        self.packed: dict[int, PackedWeights] = {}
        self.mode = "resident"
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.plan: list[nn.Module] = []
        self._pos = 0  # index in the plan of the module in use
        self._stream: torch.cuda.Stream | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # one side stream per device, reused

    # ------------------------------------------------------------------------------------------ queries
    def on_device(self, module: nn.Module) -> bool:
        """Whether ``module``'s weights are (or are on their way) on the device as managed here."""
        pw = self.packed.get(id(module))
        return pw is not None and pw.device_buf is not None

    def device_bytes(self) -> int:
        """Bytes of packed weights on the device now."""
        return sum(pw.nbytes for pw in self.packed.values() if pw.device_buf is not None)

    # ------------------------------------------------------------------------------------------ a call
    def begin(self, plan: Sequence[nn.Module], device: torch.device, dtype: torch.dtype, mode: str,
              others: Sequence[nn.Module] = ()) -> None:
        """Start a call: ``plan`` lists the models in the order :meth:`use` will be called (a module may appear
        several times), ``others`` the pipeline's models the call does not use (sent to the host unless
        ``"resident"``)."""
        if mode not in RESIDENCY:
            raise ValueError(f"expected residency in {RESIDENCY}, got {mode!r}")
        self.mode, self.device, self.dtype = mode, torch.device(device), dtype
        self.plan = list(plan)
        self._pos = 0
        cuda = self.device.type == "cuda"
        self._stream = None
        if cuda and mode == "prefetch":
            self._stream = self._streams.setdefault(self.device, torch.cuda.Stream(self.device))
        with torch.inference_mode(False):  # packed tensors must stay usable outside inference mode
            if mode == "resident":
                for m in _unique(self.plan):
                    self._place_whole(m)
                return
            for m in _unique([*self.plan, *others]):
                self._refresh(m)
            planned = {id(p) for p in self.plan}
            for m in _unique(others):
                if id(m) not in planned:
                    self._evict(m)
            if self.plan:
                self._schedule(0)

    def use(self, module: nn.Module) -> contextlib.AbstractContextManager[None]:
        """Context: ``module`` on the device (waited for) while it computes; brings the next ones in ahead."""
        return self._use(module)

    @contextlib.contextmanager
    def _use(self, module: nn.Module) -> Iterator[None]:
        with torch.inference_mode(False):
            if self.mode == "resident":
                self._place_whole(module)
            else:
                # Its next place in the plan from the current one (a module may run at several stages).
                order = [*range(self._pos, len(self.plan)), *range(self._pos)]
                idx = next((i for i in order if self.plan[i] is module), None)
                if idx is None:  # not announced: bring it in now
                    self.plan.append(module)
                    idx = len(self.plan) - 1
                self._pos = idx
                self._schedule(idx)
                self._packed(module).wait()
        try:
            yield
        finally:
            if self.mode == "low_vram":
                with torch.inference_mode(False):
                    self._evict(module)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def end(self) -> None:
        """Call over: in ``"prefetch"`` / ``"low_vram"`` mode every managed model goes back to the host."""
        if self.mode != "resident":
            with torch.inference_mode(False):
                for pw in self.packed.values():
                    pw.evict()
        self._stream = None

    def release(self) -> None:
        """Every managed model gets independent tensors again and is forgotten here (e.g. before saving)."""
        for pw in self.packed.values():
            pw.release()
        self.packed.clear()

    # ------------------------------------------------------------------------------------------ helpers
    def _schedule(self, idx: int) -> None:
        """Models ``idx .. idx + lookahead`` of the plan in (``low_vram``: ``idx`` only); earlier ones out."""
        ahead = 0 if self.mode == "low_vram" else self.lookahead
        window = self.plan[idx: idx + ahead + 1]
        keep = {id(m) for m in window}
        for m in _unique(self.plan):
            if id(m) not in keep:
                self._evict(m)
        for m in _unique(window):
            self._packed(m).load(self.device, self._stream)

    def _refresh(self, module: nn.Module) -> None:
        """Forget a packing that no longer describes ``module`` (other dtype, tensors replaced from outside)."""
        pw = self.packed.get(id(module))
        if pw is None:
            return
        if not pw.intact():
            del self.packed[id(module)]  # module.to(...), new parameters: the next use packs the new tensors
        elif pw.dtype != self.dtype:
            pw.release()
            del self.packed[id(module)]

    def _packed(self, module: nn.Module) -> PackedWeights:
        pw = self.packed.get(id(module))
        if pw is None:
            pw = PackedWeights(module, self.dtype, pin=torch.cuda.is_available() and self.device.type == "cuda")
            self.packed[id(module)] = pw
        return pw

    def _evict(self, module: nn.Module) -> None:
        pw = self.packed.get(id(module))
        if pw is not None:
            pw.evict()
        elif _device_of(module) not in (None, torch.device("cpu")):
            self._packed(module)  # packing leaves the module on its host copy

    def _place_whole(self, module: nn.Module) -> None:
        pw = self.packed.pop(id(module), None)
        if pw is not None and pw.intact():
            pw.release()
        p = next(module.parameters(), None)
        if p is None or p.device != self.device or p.dtype != self.dtype:
            module.to(device=self.device, dtype=self.dtype)


def _device_of(module: nn.Module) -> torch.device | None:
    p = next(module.parameters(), None)
    return None if p is None else p.device


def _unique(modules: Sequence[nn.Module]) -> list[nn.Module]:
    out: dict[int, nn.Module] = {}
    for m in modules:
        out.setdefault(id(m), m)
    return list(out.values())

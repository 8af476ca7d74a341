"""Process groups and everything that wraps a single-device model from outside: activation checkpointing,
DDP, FSDP2 sharding, gradient-sync control and the full state dicts used by checkpoints.

Start several processes with ``torchrun --nproc_per_node N -m d3s2.cli train ...``; a plain ``python``
launch is world size 1 and needs no process group. CUDA uses NCCL, CPU uses gloo.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import fnmatch
import functools
import itertools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

__all__ = ["DistInfo", "init_distributed", "shutdown_distributed", "match_modules",
           "apply_activation_checkpointing", "parallelize", "gradient_sync", "all_reduce_mean",
           "gather_objects", "check_sharded", "full_state_dicts", "load_full_state_dicts", "unwrap"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# Process groups this process has joined: every rank joins as often (the same program), so the counts agree.
_groups_joined = itertools.count()


def init_distributed(device: Literal["auto", "cpu", "cuda"] = "auto") -> DistInfo:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK, pick the device and join the process group if W > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device is 'cuda' but CUDA is not available")
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=30)
        store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        # torchrun's store outlives a group: a group joined again under the default prefix would find the previous
        # group's keys (gloo addresses, NCCL ids) and connect to a socket that is gone. Each group gets its own.
        store = dist.PrefixStore(f"d3s2_group_{next(_groups_joined)}", store)
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout, "store": store, "rank": rank,
                                  "world_size": world}
        if dev.type == "cuda":
            kwargs["device_id"] = dev  # binds NCCL to this GPU up front (no guessing at the first collective)
        dist.init_process_group(**kwargs)
        log.info("rank %d/%d joined the %s process group on %s", rank, world, backend, dev)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- module selection
def match_modules(model: nn.Module, patterns: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """Submodules whose class name equals a pattern or whose dotted name matches it (fnmatch), outermost first.

    A module inside an already matched one is skipped. Raises when a pattern matches nothing.
    """
    chosen: list[tuple[str, nn.Module]] = []
    used = dict.fromkeys(patterns, False)
    for name, module in model.named_modules():
        if not name:
            continue
        hits = [p for p in patterns if type(module).__name__ == p or fnmatch.fnmatchcase(name, p)]
        if not hits:
            continue
        for p in hits:
            used[p] = True
        if any(name.startswith(outer + ".") for outer, _ in chosen):
            continue
        chosen.append((name, module))
    unused = [p for p, hit in used.items() if not hit]
    if unused:
        names = [n for n, _ in model.named_modules() if n][:12]
        raise ValueError(f"module pattern(s) {unused} matched no submodule; patterns are class names or dotted "
                         f"names with wildcards, e.g. {names}")
    return chosen


def _checkpointed_forward(forward, *args, **kwargs):
    # Non-reentrant checkpointing handles non-tensor inputs (SparseTensor) and keyword arguments.
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Recompute the forward of matching submodules during backward instead of storing activations.

    The module's bound ``forward`` is replaced on the instance, so parameter names and state dicts are
    unchanged. Returns the names of the wrapped modules.
    """
    names = []
    for name, module in match_modules(model, patterns):
        module.forward = functools.partial(_checkpointed_forward, module.forward)
        names.append(name)
    return names


# --------------------------------------------------------------------------- parallel wrappers
def parallelize(
    model: nn.Module,
    info: DistInfo,
    *,
    mode: Literal["ddp", "fsdp"] = "ddp",
    fsdp_units: Sequence[str] = (),
    bf16: bool = False,
    find_unused_parameters: bool = False,
    bucket_mb: float = 25.0,
    rank_order_reduce: bool = False,
) -> nn.Module:
    """Wrap a model already on ``info.device`` for ``info.world_size`` processes; returns it unchanged for W = 1.

    ``ddp``: DistributedDataParallel (the whole model on every rank; gradients all-reduced in buckets of
    ``bucket_mb`` MB, each launched as soon as its gradients are ready). With ``rank_order_reduce`` (set by
    ``train.deterministic``) each gradient is summed in rank order wherever it sits in a bucket (see
    ``_rank_order_mean``), so a resumed run reduces like an uninterrupted one.
    ``fsdp``: FSDP2 ``fully_shard`` on each ``fsdp_units`` module, then on the root (parameters, gradients and
    optimizer state sharded over ranks); with ``bf16`` parameters are gathered in bf16, gradients reduced in fp32.
    """
    if not info.distributed:
        return model
    if mode == "ddp":
        if find_unused_parameters:
            # DDP searches the output for tensors to find unused parameters.
            _expose_output_tensors(model, only_inside_ddp=True)
        # device_ids=None: the model is on one device already and batches are moved by the trainer.
        # gradient_as_bucket_view: gradients live in the all-reduce buckets (no copy in and out of them).
        ddp = _DDP(model, find_unused_parameters=find_unused_parameters, gradient_as_bucket_view=True,
                   bucket_cap_mb=bucket_mb)
        if rank_order_reduce:
            ddp.register_comm_hook(None, _rank_order_mean)
        return ddp
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs: dict[str, Any] = {}
        if bf16:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for module in [m for _, m in match_modules(model, fsdp_units)] + [model]:
            unwrap_hook = _expose_output_tensors(module)
            fully_shard(module, **kwargs)
            module.register_forward_hook(unwrap_hook)  # runs after FSDP's own post-forward hook
        return model
    raise ValueError(f"expected parallel mode 'ddp' or 'fsdp', got {mode!r}")


# True while UnwrappingDDP.forward runs: calls of the bare module (validation) get their plain output.
_INSIDE_DDP: contextvars.ContextVar[bool] = contextvars.ContextVar("d3s2_inside_ddp", default=False)


class _Exposed(NamedTuple):
    """A module output plus the tensors inside it, in a container FSDP traverses."""

    value: Any
    tensors: tuple[torch.Tensor, ...]


def _find_tensors(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    """Tensors inside ``obj``: containers, dataclasses and plain objects' attributes (e.g. SparseTensor.feats)."""
    if depth > 6:
        return []
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        items = list(obj.values())
    elif isinstance(obj, list | tuple):
        items = list(obj)
    elif hasattr(obj, "__dict__") or hasattr(type(obj), "__slots__"):
        # Public attributes only: private ones hold caches (e.g. SparseTensor's neighbour maps).
        names = list(getattr(obj, "__dict__", {})) + list(getattr(type(obj), "__slots__", ()))
        items = [getattr(obj, n, None) for n in names if not n.startswith("_")]
    else:
        return []
    return [t for item in items for t in _find_tensors(item, depth + 1)]


def _expose_output_tensors(module: nn.Module, *, only_inside_ddp: bool = False):
    """Let FSDP2 / DDP see tensors inside outputs they cannot traverse (SparseTensor, custom classes).

    FSDP2 hooks the module's output tensors to unshard parameters for backward and to reduce-scatter
    gradients afterwards, and DDP with ``find_unused_parameters`` searches the output for the autograd graph;
    both only look inside tuples, lists, dicts and dataclasses, so a SparseTensor output would silently skip
    gradient synchronisation. A first forward hook wraps the output as ``_Exposed`` (a NamedTuple they
    traverse). FSDP: the returned hook, registered after ``fully_shard``, unwraps it again; DDP: the wrapper
    unwraps it.
    """
    def expose(mod: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor) or (only_inside_ddp and not _INSIDE_DDP.get()):
            return output
        return _Exposed(output, tuple(_find_tensors(output)))

    def unwrap_output(mod: nn.Module, args: Any, output: Any) -> Any:
        return output.value if isinstance(output, _Exposed) else output

    module.register_forward_hook(expose, prepend=True)
    return unwrap_output


def check_sharded(model: nn.Module) -> None:
    """Raise unless every parameter is a sharded DTensor again (FSDP2 ran its post-backward resharding)."""
    from torch.distributed.tensor import DTensor

    unsharded = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if unsharded:
        raise RuntimeError(f"FSDP did not reshard {unsharded[:3]} after backward: the model output hides its "
                           "tensors from FSDP (return tensors, SparseTensors, tuples/dicts/dataclasses of them)")


@functools.cache
def _ddp_class() -> type:
    from torch.nn.parallel import DistributedDataParallel

    class UnwrappingDDP(DistributedDataParallel):
        """DDP that hands the caller the model's own output when the model's output was wrapped as _Exposed."""

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            token = _INSIDE_DDP.set(True)
            try:
                out = super().forward(*args, **kwargs)
            finally:
                _INSIDE_DDP.reset(token)
            return out.value if isinstance(out, _Exposed) else out

    return UnwrappingDDP


# No annotations on bucket and result: DDP compares them with the classes, and this module's are strings.
def _rank_order_mean(group, bucket):
    """DDP communication hook: the mean over ranks of a gradient bucket (``dist.GradBucket``), each element summed
    in rank order; returns a ``torch.futures.Future`` of the bucket's tensor.

    An all-reduce (NCCL's ring or tree, gloo's ring) adds the ranks' values of an element in an order set by the
    element's position in the buffer, and DDP re-buckets its gradients in their ready order after the first step of
    each process: a resumed run's first step would reduce in other orders than the uninterrupted run's and differ
    in the last bits from 3 ranks on. Here every rank gathers every rank's bucket and adds them in rank order. One
    collective per bucket, as DDP's own hook (a second one started from a callback would be issued in a different
    order on each rank under gloo), but each rank receives (W - 1) buckets against 2 (W - 1) / W for a ring
    all-reduce: the same at 2 ranks, 2x at 4, 3.5x at 8, and W buckets of memory while it runs.
    """
    world = dist.get_world_size(group)
    grads = bucket.buffer()
    gathered = grads.new_empty(world * grads.numel())

    def add_in_rank_order(all_gather: torch.futures.Future) -> torch.Tensor:
        all_gather.value()  # raises if the all-gather failed
        per_rank = gathered.view(world, grads.numel())
        total = per_rank[0].clone()
        for rank_grads in per_rank[1:]:
            total += rank_grads
        return total.div_(world).view_as(grads)

    return _all_gather_single(gathered, grads, group=group, async_op=True).get_future().then(add_in_rank_order)


# torch 2.12 renamed all_gather_into_tensor (deprecated since) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _DDP(model: nn.Module, **kwargs: Any) -> nn.Module:
    return _ddp_class()(model, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place, so it is returned as is)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce for accumulation micro-batches (``enabled=False``) under DDP or FSDP2."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP):
        with contextlib.nullcontext() if enabled else model.no_sync():
            yield
        return
    setter = getattr(model, "set_requires_gradient_sync", None)  # present on FSDP2-sharded modules
    if setter is not None:
        setter(enabled)
    yield


# --------------------------------------------------------------------------- collectives
def all_reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average a dict of floats over ranks; a key missing on some ranks is averaged over the ranks that have it."""
    if not info.distributed:
        return dict(values)
    keys = sorted(set().union(*gather_objects(sorted(values), info)))
    if not keys:
        return {}
    device = info.device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([[float(values.get(k, 0.0)), float(k in values)] for k in keys], dtype=torch.float64,
                     device=device)  # [K, 2]: value, present
    dist.all_reduce(t)
    return {k: s / n for k, (s, n) in zip(keys, t.tolist())}


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- state dicts
def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts on the CPU, keyed by parameter name.

    Collective under FSDP (call on every rank; ranks other than 0 get empty dicts there).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                          optim_state: dict | None) -> None:
    """Load full state dicts (as written by :func:`full_state_dicts`) into a possibly sharded model/optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(model, optimizer, optim_state, options=options)

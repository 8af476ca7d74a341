"""Token-budget batching: items packed into micro-batches, micro-batches split over ranks step by step.

An epoch's plan is a list of micro-batches (lists of item indices) that depends only on (seed, epoch), never
on the world size. Optimizer step ``s`` of the epoch consumes micro-batches ``[s·M, (s+1)·M)`` with
``M = data.micro_batches_per_step``; rank ``r`` of ``W`` takes the ``A = M / W`` consecutive ones from
``s·M + r·A`` and accumulates their gradients. So 1 process and ``W`` processes see the same global batch,
and a run resumes from ``(epoch, step)`` alone. :class:`EpochStreamSampler` chains the epochs' shares into one
stream of ``(epoch, item)`` keys, read through :class:`EpochItems`, so one DataLoader (one set of worker
processes) serves the whole run.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["item_rng", "seed_global_rngs", "preserved_global_rngs", "pack_batches", "StepBatchSampler",
           "EpochStreamSampler", "EpochItems", "already_collated", "rank_share"]


def item_rng(*keys: int) -> np.random.Generator:
    """A numpy Generator determined by non-negative integer keys, e.g. ``item_rng(seed, epoch, index)``."""
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"expected non-negative keys, got {keys}")
    return np.random.default_rng([int(k) for k in keys])


def seed_global_rngs(*keys: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch's CPU generator from non-negative integer keys (as
    :func:`item_rng`). CUDA generators are not touched (``torch.manual_seed`` would reseed them too)."""
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"expected non-negative keys, got {keys}")
    words = np.random.SeedSequence([int(k) for k in keys]).generate_state(4)  # uint32 [4]
    random.seed(int(words[0]) << 32 | int(words[1]))
    np.random.seed(words)
    torch.default_generator.manual_seed(int(words[2]) << 32 | int(words[3]))


@contextlib.contextmanager
def preserved_global_rngs() -> Iterator[None]:
    """Give python's ``random``, numpy's global RNG and torch's CPU generator back, after the block, the states they
    had before it."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def pack_batches(
    lengths: Sequence[int],
    *,
    max_tokens: int,
    max_batch_size: int = 0,
    groups: Sequence[Hashable] | None = None,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    sort_window: int = 64,
    step_size: int = 1,
) -> list[list[int]]:
    """Pack item indices into micro-batches of at most ``max_tokens`` tokens (and ``max_batch_size`` items).

    Items are shuffled (seeded by ``seed, epoch``), split into windows of ``sort_window`` items per group and
    each window is packed first-fit-decreasing; the batch order is shuffled again. An item longer than
    ``max_tokens`` gets a batch of its own. Deterministic for given arguments.

    ``step_size > 1`` (the micro-batches of one optimizer step): micro-batches are grouped into consecutive runs
    of ``step_size`` of similar total length (sorted by it, then the runs shuffled), so the ranks that share a step
    get equal work whatever the world size; the run left over (fewer than ``step_size``) comes last.

    Args:
        lengths: ``[n]`` tokens (or cost in token units) per item.
        groups: ``[n]`` group of each item (items of one batch share a group); ``None``: one group.
    Returns:
        micro-batches, each a list of item indices.
    """
    n = len(lengths)
    if max_tokens < 1:
        raise ValueError(f"expected max_tokens >= 1, got {max_tokens}")
    if groups is not None and len(groups) != n:
        raise ValueError(f"expected one group per item ({n}), got {len(groups)}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    streams: dict[Hashable, list[int]] = {}
    for i in order.tolist():
        streams.setdefault(groups[i] if groups is not None else 0, []).append(i)
    batches: list[list[int]] = []
    for stream in streams.values():
        for start in range(0, len(stream), sort_window):
            window = sorted(stream[start: start + sort_window], key=lambda i: -int(lengths[i]))
            open_batches: list[list[int]] = []
            room: list[int] = []
            for i in window:
                cost = int(lengths[i])
                for b, left in enumerate(room):
                    if cost <= left and (max_batch_size <= 0 or len(open_batches[b]) < max_batch_size):
                        open_batches[b].append(i)
                        room[b] -= cost
                        break
                else:
                    open_batches.append([i])
                    room.append(max_tokens - cost)
            batches.extend(open_batches)
    if step_size > 1:
        return _balanced_steps(batches, lengths, step_size, rng if shuffle else None)
    if shuffle:
        perm = rng.permutation(len(batches))
        batches = [batches[j] for j in perm.tolist()]
    return batches


def _balanced_steps(batches: list[list[int]], lengths: Sequence[int], step_size: int,
                    rng: np.random.Generator | None) -> list[list[int]]:
    """Batches sorted by total length (longest first, ties in packing order), cut into runs of ``step_size``,
    each run ordered outside-in, the full runs shuffled; the remainder run last."""
    totals = [sum(int(lengths[i]) for i in b) for b in batches]
    order = sorted(range(len(batches)), key=lambda j: -totals[j])  # stable
    runs = [order[i: i + step_size] for i in range(0, len(order), step_size)]
    tail = runs.pop() if runs and len(runs[-1]) < step_size else []
    # Inside a run: largest, smallest, 2nd largest, 2nd smallest, ...: consecutive pairs (and pairs of pairs) have
    # similar sums, so ranks taking consecutive shares of a step get similar work for any world size.
    runs = [[run[j // 2] if j % 2 == 0 else run[-1 - j // 2] for j in range(len(run))] for run in runs]
    if rng is not None:
        runs = [runs[j] for j in rng.permutation(len(runs)).tolist()]
    return [batches[j] for run in runs for j in run] + [batches[j] for j in tail]


class StepBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches for the optimizer steps ``[start_step, num_steps)`` of one epoch's plan.

    Yields ``A = micro_batches_per_step // world_size`` micro-batches per step; the plan's tail that does not
    fill a whole step is dropped.
    """

    def __init__(self, batches: Sequence[Sequence[int]], *, micro_batches_per_step: int, rank: int,
                 world_size: int, start_step: int = 0) -> None:
        if micro_batches_per_step % world_size:
            raise ValueError(f"data.micro_batches_per_step ({micro_batches_per_step}) must be divisible by the "
                             f"number of processes ({world_size})")
        self.batches = batches
        self.m = micro_batches_per_step
        self.a = micro_batches_per_step // world_size
        self.rank = rank
        self.start_step = start_step

    @property
    def num_steps(self) -> int:
        return len(self.batches) // self.m

    def __iter__(self) -> Iterator[list[int]]:
        for s in range(self.start_step, self.num_steps):
            base = s * self.m + self.rank * self.a
            for j in range(self.a):
                yield list(self.batches[base + j])

    def __len__(self) -> int:
        return max(self.num_steps - self.start_step, 0) * self.a


class EpochStreamSampler(Sampler[list[tuple[int, int]]]):
    """This rank's micro-batches of epochs ``epoch, epoch + 1, ...`` (from ``start_step`` of the first), endlessly.

    Each micro-batch is a list of ``(epoch, item)`` keys for :class:`EpochItems`. One stream instead of one
    DataLoader per epoch: a new loader forks its workers in the training loop's thread (≈ 0.3 s for 14 workers
    of a CUDA process), which stalls every epoch's first step.

    Args:
        plan: ``epoch -> micro-batches`` of that epoch (e.g. :func:`pack_batches`); called in the main process.
    """

    def __init__(self, plan: Callable[[int], Sequence[Sequence[int]]], *, micro_batches_per_step: int, rank: int,
                 world_size: int, epoch: int = 0, start_step: int = 0) -> None:
        if micro_batches_per_step % world_size:
            raise ValueError(f"data.micro_batches_per_step ({micro_batches_per_step}) must be divisible by the "
                             f"number of processes ({world_size})")
        self.plan, self.m, self.rank, self.world_size = plan, micro_batches_per_step, rank, world_size
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.epoch, self.start_step
        while True:
            share = StepBatchSampler(self.plan(epoch), micro_batches_per_step=self.m, rank=self.rank,
                                     world_size=self.world_size, start_step=start)
            if share.num_steps == 0:
                raise ValueError(f"epoch {epoch} packs into fewer than {self.m} micro-batches: no optimizer step")
            for batch in share:
                yield [(epoch, i) for i in batch]
            epoch, start = epoch + 1, 0


class EpochItems:
    """A dataset read by ``(epoch, index)`` keys: sets the epoch (per-item randomness) and returns ``dataset[index]``.

    The epoch travels with each key, so worker processes (which hold copies of the dataset) always use the epoch
    of the item they load. Each item is loaded with the global RNGs (python, numpy, torch CPU) seeded from
    ``(seed, epoch, index)`` (:func:`seed_global_rngs`), so a dataset that draws from them gives the same item in
    any worker, with any number of workers and after a resume; the caller's RNG states are given back after.

    With ``collate``, a micro-batch of keys (``__getitems__``, what a DataLoader with a batch sampler calls) reads
    as the collated batch, collated with the global RNGs seeded from its first key: give that DataLoader
    :func:`already_collated` as its ``collate_fn``.
    """

    COLLATE_KEY = 1  # appended to the first item's key: collate's RNG stream differs from that item's

    def __init__(self, dataset: Any, *, seed: int = 0, collate: Callable[[list[Any]], Any] | None = None) -> None:
        self.dataset = dataset
        self.seed = seed
        self.collate = collate
        self._set_epoch = getattr(dataset, "set_epoch", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if callable(self._set_epoch):
            self._set_epoch(epoch)
        seed_global_rngs(self.seed, epoch, index)
        return self.dataset[index]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        with preserved_global_rngs():
            return self._load(key)

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> Any:
        with preserved_global_rngs():  # once per micro-batch: saving numpy's state costs ~10x seeding it
            items = [self._load(key) for key in keys]
            if self.collate is None:
                return items
            seed_global_rngs(self.seed, *keys[0], self.COLLATE_KEY)
            return self.collate(items)


def already_collated(batch: Any) -> Any:
    """The DataLoader ``collate_fn`` for :class:`EpochItems` with ``collate``: the batch as it comes."""
    return batch


def rank_share(batches: Sequence[Sequence[int]], *, rank: int, world_size: int) -> list[list[int]]:
    """Rank ``rank``'s share of (validation) micro-batches: ``ceil(L / W)`` each, wrapping around, so that every
    rank runs the same number of forward passes (FSDP needs them in lockstep)."""
    if not batches:
        return []
    per_rank = -(-len(batches) // world_size)
    return [list(batches[(rank + world_size * i) % len(batches)]) for i in range(per_rank)]

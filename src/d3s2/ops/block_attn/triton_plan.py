"""The selection plan for a forward only: entries grouped by (kv head, block) with integer atomics, in three kernels.

The selection plan groups the E = N·Hkv·S entries of ``block_idx`` [N, Hkv, S] into one list per (kv head g,
block b), key ``g·NB + b`` (``Hkv·NB`` for an empty slot: after every list). The stable ``torch.sort`` plan puts a
list's entries in ascending order, which the deterministic dK/dV backward needs (it sums over a list in its order).
A forward does not: each row of a tile is computed on its own, so its output does not depend on which entries share
its tile. For a forward that no backward will follow, this plan takes each entry's place in its list from an
integer ``atomic_add`` on the list's counter: the lists hold the same entries as the sort's, in an order that may
change from run to run, at a fraction of the sort's cost (no radix passes, no int64 indices, three launches).

1. ``_plan_rank_kernel``: counter[key] += 1 per entry; the old value is the entry's rank in its list.
2. ``_plan_start_kernel`` (one program): each list's first place, the exclusive cumsum of the counters.
3. ``_plan_place_kernel``: entry f goes to ``start[key] + rank``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # entries per program of the rank and place kernels
SCAN_BLOCK = 1024  # counters per step of the one-program scan


@triton.jit
def _entry_keys(IDX, f, E, NB, S: tl.constexpr, HKV: tl.constexpr):
    """Keys of entries f (g·NB + b; Hkv·NB for an empty slot) and which f are entries (f < E)."""
    ok = f < E
    b = tl.load(IDX + f, mask=ok, other=-1)
    g = (f // S) % HKV  # f = (i·Hkv + g)·S + s
    return tl.where((b >= 0) & (b < NB), g * NB + b, HKV * NB), ok


@triton.jit(do_not_specialize=["E", "NB"])
def _plan_rank_kernel(IDX, COUNT, RANK, E, NB, S: tl.constexpr, HKV: tl.constexpr, BLOCK: tl.constexpr):
    """RANK[f] = the entry's place in its list's counter order; COUNT[key] ends as the list's length."""
    f = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    key, ok = _entry_keys(IDX, f, E, NB, S, HKV)
    rank = tl.atomic_add(COUNT + key, 1, mask=ok, sem="relaxed")
    tl.store(RANK + f, rank, mask=ok)


@triton.jit(do_not_specialize=["L1"])
def _plan_start_kernel(COUNT, START, L1, BLOCK: tl.constexpr):
    """START[l] = Σ_{l' < l} COUNT[l'] for l < L1 (one program)."""
    carry = 0
    for l0 in range(0, L1, BLOCK):
        lst = l0 + tl.arange(0, BLOCK)
        c = tl.load(COUNT + lst, mask=lst < L1, other=0)
        tl.store(START + lst, carry + tl.cumsum(c, 0) - c, mask=lst < L1)
        carry += tl.sum(c, 0)


@triton.jit(do_not_specialize=["E", "NB"])
def _plan_place_kernel(IDX, RANK, START, ENTRY, E, NB, S: tl.constexpr, HKV: tl.constexpr, BLOCK: tl.constexpr):
    """ENTRY[START[key] + RANK[f]] = f."""
    f = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    key, ok = _entry_keys(IDX, f, E, NB, S, HKV)
    place = tl.load(START + key, mask=ok, other=0) + tl.load(RANK + f, mask=ok, other=0)
    tl.store(ENTRY + place, f, mask=ok)


def atomic_plan(block_idx: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entry int32 [E], list_start int32 [Hkv·NB], list_count int32 [Hkv·NB]) of ``block_idx`` int32 contiguous
    [N, Hkv, S]: the sort plan's lists, each in an order that may differ from run to run (forward only)."""
    n, hkv, s = block_idx.shape
    lists = hkv * num_blocks
    e = n * hkv * s
    dev = block_idx.device
    count = torch.zeros(lists + 1, dtype=torch.int32, device=dev)  # + the empty slots' list
    start = torch.empty(lists + 1, dtype=torch.int32, device=dev)
    entry = torch.empty(e, dtype=torch.int32, device=dev)
    if e:
        rank = torch.empty(e, dtype=torch.int32, device=dev)
        grid = (triton.cdiv(e, BLOCK),)
        _plan_rank_kernel[grid](block_idx, count, rank, e, num_blocks, S=s, HKV=hkv, BLOCK=BLOCK, num_warps=4)
        _plan_start_kernel[(1,)](count, start, lists + 1, BLOCK=SCAN_BLOCK, num_warps=4)
        _plan_place_kernel[grid](block_idx, rank, start, entry, e, num_blocks, S=s, HKV=hkv, BLOCK=BLOCK,
                                 num_warps=4)
    else:
        start.zero_()
    return entry, start[:lists], count[:lists]

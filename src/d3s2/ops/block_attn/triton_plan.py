"""Counting sort of the selection entries by (kv head, block): the selection plan in two Triton kernels.

The selection plan groups the E = N·Hkv·S entries of ``block_idx`` [N, Hkv, S] into one list per (kv head g,
block b), key ``g·NB + b`` (``Hkv·NB`` for an empty slot), in ascending entry order within a list: a stable sort.
``torch.sort`` does it in a radix sort plus about a dozen elementwise and search kernels around it; with few lists
(≤ ``MAX_LISTS``) a counting sort takes two passes over ``block_idx``:

1. ``_plan_count_kernel``: each program takes a chunk of consecutive entries and writes their histogram over the
   keys, a row of ``counts`` [P, L1] (L1 = Hkv·NB + 1 keys, P programs).
2. In torch, on [P, L1]: ``start`` = exclusive cumsum of the key totals (each list's first position), the column
   cumsum (entries of that key in earlier chunks) and the row cumsum (entries of smaller keys in this chunk).
3. ``_plan_scatter_kernel``: each program sorts its chunk's ``key · chunk + position`` in registers; an entry's
   rank in the sorted chunk minus the chunk's count of smaller keys is its rank among the chunk's entries of its
   key, so its place is ``start[key] + (earlier chunks' entries of key) + that rank``.

Same output as the stable ``torch.sort`` (tests compare them exactly), no host sync (CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# "chunk": entries per program (power of two; the sort runs in registers, and P·L1 counts stay ≲ E for L1 ≲ chunk);
# "histogram": the chunk's counts by tl.histogram (in the SM), else by integer atomics in global memory
CONFIG = {"chunk": 4096, "num_warps": 8, "histogram": True}
MAX_LISTS = 8190  # L1 + a discard bin must fit the histogram's 8192 bins (power of two); more keys: torch.sort


@triton.jit
def _chunk_keys(IDX, p, E, NB, S: tl.constexpr, HKV: tl.constexpr, CHUNK: tl.constexpr, DISCARD: tl.constexpr):
    """Positions 0 … CHUNK of chunk p and their keys: g·NB + b, Hkv·NB for an empty slot, DISCARD past E."""
    local = tl.arange(0, CHUNK)
    f = p * CHUNK + local
    ok = f < E
    b = tl.load(IDX + f, mask=ok, other=-1)
    g = (f // S) % HKV  # f = (i·Hkv + g)·S + s
    key = tl.where((b >= 0) & (b < NB), g * NB + b, HKV * NB)
    return local, tl.where(ok, key, DISCARD)


@triton.jit(do_not_specialize=["E", "NB", "L1"])
def _plan_count_kernel(IDX, COUNTS, E, NB, L1, S: tl.constexpr, HKV: tl.constexpr, CHUNK: tl.constexpr,
                       BINS: tl.constexpr, HISTOGRAM: tl.constexpr):
    """COUNTS[p, key] for key < L1: entries of chunk p with that key (int32 [P, L1]; zeroed first unless
    HISTOGRAM)."""
    p = tl.program_id(0)
    _, key = _chunk_keys(IDX, p, E, NB, S, HKV, CHUNK, BINS - 1)
    if HISTOGRAM:
        hist = tl.histogram(key, BINS)
        bins = tl.arange(0, BINS)
        tl.store(COUNTS + p * L1 + bins, hist, mask=bins < L1)
    else:  # integer adds: the counts do not depend on their order
        tl.atomic_add(COUNTS + p * L1 + key, 1, mask=key < L1, sem="relaxed")


@triton.jit(do_not_specialize=["E", "NB", "L1"])
def _plan_scatter_kernel(IDX, DELTA, ENTRY, E, NB, L1, S: tl.constexpr, HKV: tl.constexpr, CHUNK: tl.constexpr,
                         BINS: tl.constexpr):
    """ENTRY[sorted place] = entry index, for the entries of chunk p. DELTA[p, key] (int32 [P, L1]) = place of the
    chunk's first entry of that key minus that entry's position in the chunk's sorted keys."""
    p = tl.program_id(0)
    local, key = _chunk_keys(IDX, p, E, NB, S, HKV, CHUNK, BINS - 1)
    packed = tl.sort(key * CHUNK + local)  # by key, then position: stable
    skey = packed // CHUNK
    ok = skey < L1
    rank = tl.arange(0, CHUNK)
    place = rank + tl.load(DELTA + p * L1 + skey, mask=ok, other=0)
    tl.store(ENTRY + place, p * CHUNK + packed % CHUNK, mask=ok)


def counting_plan(block_idx: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entry int32 [E], list_start int32 [Hkv·NB], list_count int32 [Hkv·NB]) of ``block_idx`` int32 contiguous
    [N, Hkv, S]; ``Hkv·NB + 1 ≤ MAX_LISTS``."""
    n, hkv, s = block_idx.shape
    lists = hkv * num_blocks
    l1 = lists + 1
    if l1 > MAX_LISTS:
        raise ValueError(f"expected at most {MAX_LISTS - 1} lists (kv heads × blocks) for the counting sort, "
                         f"got {lists}")
    e = n * hkv * s
    dev = block_idx.device
    entry = torch.empty(e, dtype=torch.int32, device=dev)
    if e == 0:
        zero = torch.zeros(lists, dtype=torch.int32, device=dev)
        return entry, zero, zero.clone()
    cfg = CONFIG
    programs = triton.cdiv(e, cfg["chunk"])
    bins = triton.next_power_of_2(l1 + 1)  # + a discard bin for positions past E
    consts = {"S": s, "HKV": hkv, "CHUNK": cfg["chunk"], "BINS": bins, "num_warps": cfg["num_warps"]}
    counts = (torch.empty if cfg["histogram"] else torch.zeros)(programs, l1, dtype=torch.int32, device=dev)
    _plan_count_kernel[(programs,)](block_idx, counts, e, num_blocks, l1, HISTOGRAM=cfg["histogram"], **consts)
    total = counts.sum(0, dtype=torch.int32)
    start = torch.cumsum(total, 0, dtype=torch.int32) - total
    # place of the chunk's first entry of key l: start[l] + earlier chunks' l-entries; its sorted position in the
    # chunk: the chunk's entries of smaller keys. Inclusive cumsums: the chunk's own count cancels out.
    delta = start + torch.cumsum(counts, 0, dtype=torch.int32) - torch.cumsum(counts, 1, dtype=torch.int32)
    _plan_scatter_kernel[(programs,)](block_idx, delta, entry, e, num_blocks, l1, **consts)
    return entry, start[:lists], total[:lists]

"""Batching variable-size sparse samples: a token-budget batch sampler and a collate into SparseTensors.

Dimension legend: B batch, N band voxels (all samples), NB occupied 8³ blocks (all samples).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from d3s2.sparse import SparseTensor

log = logging.getLogger(__name__)


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices whose token counts sum to at most ``max_tokens``.

    Each epoch: shuffle (seeded by ``seed`` and :meth:`set_epoch`), then pack each window of ``sort_window``
    consecutive indices first-fit decreasing into the open batches, then shuffle the batches.
    Samples larger than the budget are skipped with a warning (``oversized="skip"``) or raise (``"error"``).
    With ``num_replicas > 1`` each rank gets every ``num_replicas``-th batch, truncated to the same count.

    Args:
        token_counts: tokens per sample (``SparseSDFDataset.token_counts``).
        max_tokens: budget per batch. max_batch_size: optional cap on samples per batch.
    """

    def __init__(self, token_counts: Sequence[int], max_tokens: int, *, shuffle: bool = True, seed: int = 0,
                 sort_window: int = 64, max_batch_size: int | None = None, oversized: str = "skip",
                 num_replicas: int = 1, rank: int = 0) -> None:
        if max_tokens < 1:
            raise ValueError(f"expected max_tokens >= 1, got {max_tokens}")
        if oversized not in ("skip", "error"):
            raise ValueError(f"expected oversized 'skip' or 'error', got {oversized!r}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"expected 0 <= rank < num_replicas, got rank {rank} of {num_replicas}")
        self.counts = np.asarray(token_counts, dtype=np.int64)
        self.max_tokens, self.shuffle, self.seed, self.epoch = int(max_tokens), shuffle, seed, 0
        self.sort_window, self.max_batch_size = max(1, sort_window), max_batch_size
        self.num_replicas, self.rank = num_replicas, rank
        big = np.flatnonzero(self.counts > self.max_tokens)
        if len(big):
            msg = (f"{len(big)} of {len(self.counts)} samples have more than max_tokens={self.max_tokens} tokens "
                   f"(largest {int(self.counts.max())})")
            if oversized == "error":
                raise ValueError(msg + "; raise max_tokens or filter them")
            log.warning("%s; they are skipped", msg)
        self._keep = np.flatnonzero(self.counts <= self.max_tokens)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch (deterministic)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self._keep) if self.shuffle else self._keep.copy()
        closed: list[list[int]] = []
        open_bins: list[list[int]] = []  # each: [tokens, idx, idx, ...]
        cap = self.max_batch_size or len(order) + 1
        for start in range(0, len(order), self.sort_window):
            window = order[start:start + self.sort_window]
            # First-fit decreasing inside each window: big samples first, small ones fill the gaps.
            for idx in window[np.argsort(-self.counts[window], kind="stable")].tolist():
                n = int(self.counts[idx])
                for b in open_bins:
                    if b[0] + n <= self.max_tokens and len(b) - 1 < cap:
                        b[0] += n
                        b.append(idx)
                        break
                else:
                    open_bins.append([n, idx])
            # Nearly full bins are closed, and all but the 16 emptiest (keeps the search short).
            still_open = []
            for b in sorted(open_bins, key=lambda b: b[0]):  # keep the emptiest open
                full = b[0] >= 0.95 * self.max_tokens or len(b) - 1 >= cap
                (closed if full or len(still_open) >= 16 else still_open).append(b)
            open_bins = still_open
        batches = [b[1:] for b in closed + open_bins]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        per_rank = len(batches) // self.num_replicas if self.num_replicas > 1 else len(batches)
        return batches[self.rank::self.num_replicas][:per_rank]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


def collate_sparse(samples: Sequence[dict]) -> dict:
    """Pack samples of :class:`SparseSDFDataset` into one batch.

    Returns a dict:
        ``sdf``: SparseTensor, feats float32 ``[N, 1]``, coords int32 ``[N, 4]`` (b, x, y, z), resolution R;
        ``sharp``: bool ``[N]`` aligned with ``sdf`` rows;
        ``blocks`` (if the samples have blocks): SparseTensor, feats float32 ``[NB, 512]`` (the truncated SDF of
        every voxel of each occupied block, in ``SparseSDF.block_targets`` order), coords ``[NB, 4]``
        (b, bx, by, bz), resolution R / 8;
        ``image`` float32 ``[B, 4, H, W]``, ``intrinsics`` ``[B, 3, 3]``, ``world_to_camera`` ``[B, 4, 4]``,
        ``view`` int64 ``[B]`` (if the samples have images); ``names`` list of B str.
    """
    if not samples:
        raise ValueError("expected at least one sample to collate")
    resolutions = {s["resolution"] for s in samples}
    if len(resolutions) != 1:
        raise ValueError(f"expected samples of one resolution, got {sorted(resolutions)}")
    if "block_inside" in samples[0]:
        raise ValueError("expected samples with block targets, got SparseSDFDataset(with_blocks='packed') ones; "
                         "batch those with collate_packed")
    (res,) = resolutions
    batch: dict = {
        "names": [s["name"] for s in samples],
        "sdf": SparseTensor.from_samples([s["coords"] for s in samples], [s["sdf"] for s in samples],
                                         resolution=res),
        "sharp": torch.cat([s["sharp"] for s in samples]),
    }
    if "block_sdf" in samples[0]:
        batch["blocks"] = SparseTensor.from_samples([s["block_coords"] for s in samples],
                                                    [s["block_sdf"] for s in samples], resolution=res // 8)
    if "image" in samples[0]:
        sizes = {tuple(s["image"].shape) for s in samples}
        if len(sizes) != 1:
            raise ValueError(f"expected images of one size, got {sorted(sizes)}; pass image_size to the dataset")
        batch["image"] = torch.stack([s["image"] for s in samples])
        batch["intrinsics"] = torch.stack([s["intrinsics"] for s in samples])
        batch["world_to_camera"] = torch.stack([s["world_to_camera"] for s in samples])
        batch["view"] = torch.tensor([s["view"] for s in samples], dtype=torch.int64)
    return batch


def collate_packed(samples: Sequence[dict]) -> dict:
    """Pack samples of ``SparseSDFDataset(with_blocks="packed")`` into one batch (the SS-VAE training layout).

    Returns a dict:
        ``sdf``: SparseTensor, feats float32 ``[N, 1]`` the stored SDF, coords int32 ``[N, 4]``, resolution R;
        ``sharp``: bool ``[N]``;
        ``blocks``: SparseTensor, feats float32 ``[NB, 0]``, coords ``[NB, 4]`` (b, bx, by, bz), resolution R / 8;
        ``inside``: uint8 ``[NB, 64]`` packed inside bits of the blocks' voxels;
        ``fill``: float32 ``[B]`` each sample's τ (its targets outside the band are ∓τ);
        ``rows``: int64 ``[N]`` row of each band voxel in the flattened targets ``[NB·512]`` of the whole batch;
        ``names``: list of B str.

    The samples were checked by the dataset (sorted, in range, inside their blocks), so the batch is built
    without a second check.
    """
    if not samples:
        raise ValueError("expected at least one sample to collate")
    resolutions = {s["resolution"] for s in samples}
    if len(resolutions) != 1:
        raise ValueError(f"expected samples of one resolution, got {sorted(resolutions)}")
    if "block_inside" not in samples[0]:
        raise ValueError("expected samples of SparseSDFDataset(with_blocks='packed')")
    (res,) = resolutions
    counts = [int(s["coords"].shape[0]) for s in samples]
    block_counts = [int(s["block_coords"].shape[0]) for s in samples]
    coords = torch.empty(sum(counts), 4, dtype=torch.int32)
    block_coords = torch.empty(sum(block_counts), 4, dtype=torch.int32)
    rows = torch.empty(sum(counts), dtype=torch.int64)
    start = block_start = 0
    for b, s in enumerate(samples):
        n, nb = counts[b], block_counts[b]
        coords[start:start + n, 0] = b
        coords[start:start + n, 1:] = s["coords"]
        block_coords[block_start:block_start + nb, 0] = b
        block_coords[block_start:block_start + nb, 1:] = s["block_coords"]
        torch.add(s["block_rows"], block_start * 512, out=rows[start:start + n])
        start, block_start = start + n, block_start + nb
    feats = torch.cat([s["sdf"] for s in samples]).reshape(-1, 1)
    return {
        "names": [s["name"] for s in samples],
        "sdf": SparseTensor(feats, coords, resolution=res, batch_size=len(samples), validate=False),
        "sharp": torch.cat([s["sharp"] for s in samples]),
        "blocks": SparseTensor(torch.zeros(len(block_coords), 0), block_coords, resolution=res // 8,
                               batch_size=len(samples), validate=False),
        "inside": torch.cat([s["block_inside"] for s in samples]),
        "fill": torch.tensor(np.array([s["band"] for s in samples], dtype=np.float32)),
        "rows": rows,
    }

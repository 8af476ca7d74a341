"""Token-budget packing and the step-wise split of micro-batches over ranks."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from d3s2.train.data import (
    EpochItems,
    EpochStreamSampler,
    StepBatchSampler,
    item_rng,
    pack_batches,
    rank_share,
    seed_global_rngs,
)


def _lengths(n=200, seed=0):
    return np.random.default_rng(seed).integers(1, 120, size=n).tolist()


def test_pack_respects_budget_and_covers_every_item_once():
    lengths = _lengths() + [500]  # one item over budget
    batches = pack_batches(lengths, max_tokens=300, max_batch_size=6, seed=1, epoch=0, sort_window=32)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 6
        assert sum(lengths[i] for i in b) <= 300 or (len(b) == 1 and lengths[b[0]] > 300)
    # First-fit-decreasing inside windows packs densely: few batches beyond the lower bound.
    assert len(batches) <= 1.25 * sum(lengths) / 300 + 8


def test_pack_is_deterministic_and_changes_per_epoch():
    lengths = _lengths()
    a = pack_batches(lengths, max_tokens=300, seed=3, epoch=2)
    assert a == pack_batches(lengths, max_tokens=300, seed=3, epoch=2)
    assert a != pack_batches(lengths, max_tokens=300, seed=3, epoch=3)
    ordered = pack_batches(lengths, max_tokens=300, shuffle=False, sort_window=1)
    assert [i for b in ordered for i in b] == list(range(len(lengths)))  # no shuffle, no sorting: input order


def test_pack_keeps_groups_apart():
    lengths = _lengths(100)
    groups = [i % 3 for i in range(100)]
    for b in pack_batches(lengths, max_tokens=400, groups=groups, seed=0):
        assert len({groups[i] for i in b}) == 1
    with pytest.raises(ValueError, match="one group per item"):
        pack_batches(lengths, max_tokens=400, groups=groups[:5])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_split_each_step_of_the_same_plan(world):
    plan = [[i] for i in range(23)]  # 23 micro-batches, 4 per step -> 5 steps, 3 dropped
    per_rank = [list(StepBatchSampler(plan, micro_batches_per_step=4, rank=r, world_size=world, start_step=1))
                for r in range(world)]
    a = 4 // world
    assert all(len(p) == 4 * a for p in per_rank)
    for step in range(4):  # steps 1..4
        union = sorted(x for p in per_rank for b in p[step * a: (step + 1) * a] for x in b)
        assert union == list(range(4 * (step + 1), 4 * (step + 2)))
    with pytest.raises(ValueError, match="must be divisible by the number of processes"):
        StepBatchSampler(plan, micro_batches_per_step=3, rank=0, world_size=2)


@pytest.mark.parametrize("world", [1, 2])
def test_epoch_stream_chains_each_epochs_share(world):
    plans = {e: [[e * 100 + i] for i in range(5 + e)] for e in range(4)}  # epoch e: 5 + e micro-batches
    for rank in range(world):
        stream = iter(EpochStreamSampler(plans.__getitem__, micro_batches_per_step=2, rank=rank, world_size=world,
                                         epoch=1, start_step=2))
        want = [[(e, i) for i in b]
                for e, start in ((1, 2), (2, 0), (3, 0))
                for b in StepBatchSampler(plans[e], micro_batches_per_step=2, rank=rank, world_size=world,
                                          start_step=start)]
        assert len(want) == 16 // world
        assert [next(stream) for _ in want] == want  # epoch 1 from step 2 on, then every step of epochs 2 and 3
    with pytest.raises(ValueError, match="divisible"):
        EpochStreamSampler(plans.__getitem__, micro_batches_per_step=3, rank=0, world_size=2)
    with pytest.raises(ValueError, match="fewer than 8 micro-batches"):
        next(iter(EpochStreamSampler(plans.__getitem__, micro_batches_per_step=8, rank=0, world_size=1)))


def test_epoch_items_load_each_key_with_its_epoch():
    class Seen:
        epoch = -1

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __getitem__(self, index):
            return self.epoch, index

        def __len__(self):
            return 3

    items = EpochItems(Seen())
    assert len(items) == 3 and items[(4, 2)] == (4, 2) and items[(1, 0)] == (1, 0)
    assert EpochItems([10, 20])[(7, 1)] == 20  # datasets without set_epoch are indexed as they are


def _global_draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.random()), float(torch.rand(()))


def test_epoch_items_seed_the_global_rngs_by_key_and_give_them_back():
    class Draws:
        def __getitem__(self, index):
            return _global_draws()

        def __len__(self):
            return 4

    items = EpochItems(Draws(), seed=3, collate=lambda batch: (batch, _global_draws()))
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    first = items[(0, 1)]
    assert items[(0, 1)] == first  # the same key draws the same values
    assert len({first, items[(1, 1)], items[(0, 2)], EpochItems(Draws(), seed=4)[(0, 1)]}) == 4
    batch, collate_draws = items.__getitems__([(0, 1), (0, 2)])
    assert batch == [first, items[(0, 2)]] and collate_draws not in batch
    assert items.__getitems__([(0, 1), (0, 2)])[1] == collate_draws
    assert EpochItems(Draws()).__getitems__([(0, 1)]) == [EpochItems(Draws())[(0, 1)]]  # no collate: the items
    # The caller's streams (the trainer's, with num_workers = 0) go on as if nothing had been drawn.
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    with pytest.raises(ValueError, match="non-negative"):
        seed_global_rngs(-1, 0)


def test_rank_share_equal_counts():
    plan = [[i] for i in range(5)]
    shares = [rank_share(plan, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in shares] == [2, 2, 2]
    assert sorted({x for s in shares for b in s for x in b}) == list(range(5))
    assert rank_share([], rank=0, world_size=2) == []


def test_item_rng():
    assert item_rng(1, 2, 3).random() == item_rng(1, 2, 3).random()
    assert item_rng(1, 2, 3).random() != item_rng(1, 2, 4).random()
    with pytest.raises(ValueError):
        item_rng(-1)


def test_token_lengths_sources():
    from d3s2.train.task import token_lengths

    class PerItem:
        def __len__(self):
            return 3

        def num_tokens(self, i):
            return 10 * i

    class Counts(PerItem):
        token_counts = [5, 6, 7]

    class Bad:
        def __len__(self):
            return 1

    assert token_lengths(PerItem()) == [0, 10, 20]
    assert token_lengths(Counts()) == [5, 6, 7]
    with pytest.raises(TypeError, match="needs token_counts or num_tokens"):
        token_lengths(Bad())


def test_balanced_steps_group_similar_micro_batches():
    costs = np.random.default_rng(4).integers(1, 400, size=300).tolist()
    kw = dict(max_tokens=500, seed=2, epoch=1, sort_window=16)
    plain = pack_batches(costs, **kw)
    balanced = pack_batches(costs, step_size=2, **kw)
    assert sorted(map(sorted, plain)) == sorted(map(sorted, balanced))  # same micro-batches, regrouped
    assert balanced == pack_batches(costs, step_size=2, **kw)  # deterministic (resume-safe)

    def spread(plan):  # mean |cost difference| between the two micro-batches of a step
        tot = [sum(costs[i] for i in b) for b in plan]
        return np.mean([abs(tot[j] - tot[j + 1]) for j in range(0, len(tot) - 1, 2)])

    assert spread(balanced) < 0.25 * spread(plain)
    # Runs are consecutive in cost order: no step's micro-batches straddle another step's.
    tot = [sum(costs[i] for i in b) for b in balanced]
    runs = sorted((min(tot[j:j + 2]), max(tot[j:j + 2])) for j in range(0, len(tot) // 2 * 2, 2))
    assert all(a[1] <= b[0] for a, b in zip(runs, runs[1:]))
    if len(tot) % 2:  # the leftover micro-batch is last and the cheapest
        assert tot[-1] == min(tot)
    # Steps of 4 split over 2 ranks: outside-in order pairs the largest with the smallest.
    four = pack_batches(costs, step_size=4, **kw)
    tot4 = [sum(costs[i] for i in b) for b in four]
    for j in range(0, len(tot4) // 4 * 4, 4):
        run = tot4[j:j + 4]
        assert run[0] >= run[2] >= run[3] >= run[1]
        assert abs((run[0] + run[1]) - (run[2] + run[3])) <= run[0] - run[1]


def test_item_costs_scaled_to_token_units():
    from d3s2.train.task import item_costs

    class Plain:
        def __len__(self):
            return 3

    class Costly(Plain):
        item_costs = [1.0, 3.0, 4.0]

    assert item_costs(Plain(), [5, 6, 7]) == [5, 6, 7]
    assert item_costs(Costly(), [10, 10, 20]) == [5, 15, 20]  # total 40 tokens, proportions of the costs
    with pytest.raises(ValueError, match="3 entries for 2 items"):
        item_costs(Costly(), [1, 2])

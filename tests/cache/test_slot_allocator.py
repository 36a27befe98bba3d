"""The KV slot allocator: every slot held once, and each request's slots in consecutive runs."""
from __future__ import annotations

import random

import numpy as np
import torch

from radixserve.cache.kv_pool import SlotAllocator

CPU = torch.device("cpu")


def breaks(slots: list[int]) -> int:
    """Places where a sequence's next slot is not the one after its previous slot."""
    return sum(b != a + 1 for a, b in zip(slots, slots[1:]))


def test_decoding_requests_write_consecutive_slots():
    alloc = SlotAllocator(1024, CPU, max_rows=4)
    seqs: dict[int, list[int]] = {row: [] for row in range(4)}
    prompt = alloc.alloc_rows([0, 1, 2, 3], [10, 20, 5, 7], [40, 40, 40, 40])
    for row, part in zip(range(4), prompt.split([10, 20, 5, 7])):
        seqs[row] += part.tolist()
    for _ in range(40):  # one token per request and step, as decode steps allocate
        step = alloc.alloc_rows([0, 1, 2, 3], [1, 1, 1, 1], [40] * 4)
        for row, slot in zip(range(4), step.tolist()):
            seqs[row].append(slot)
    # The reservation of 40 covers 40 decode steps; the 41st-step token starts a new run (one break).
    assert all(breaks(seq) <= 1 for seq in seqs.values()), seqs
    held = sum(len(seq) for seq in seqs.values())
    for row in range(4):
        alloc.release(row)
    assert alloc.available() == 1023 - held
    alloc.free(torch.tensor([s for seq in seqs.values() for s in seq]))
    assert alloc.available() == 1023 and alloc._free[1:].all()


def test_reservations_count_as_available_and_are_given_up():
    alloc = SlotAllocator(65, CPU, max_rows=2)
    a = alloc.alloc_rows([0], [8], [40])  # row 0 reserves 40 after its 8
    assert alloc.available() == 64 - 8
    b = alloc.alloc_rows([1], [50], [10])  # only 16 unreserved: row 0's reservation is given up
    assert b is not None and alloc.available() == 64 - 58
    assert not set(a.tolist()) & set(b.tolist())
    assert alloc.alloc_rows([0], [7], [0]) is None  # 6 left
    c = alloc.alloc_rows([0], [6], [0])
    assert len(set(a.tolist() + b.tolist() + c.tolist())) == 64 and alloc.available() == 0


def test_fragmented_pool_still_serves_every_free_slot():
    alloc = SlotAllocator(101, CPU, max_rows=1)
    everything = alloc.alloc(100)
    alloc.free(everything[::2])  # 50 holes of one slot
    got = alloc.alloc_rows([0], [50], [10])
    assert sorted(got.tolist()) == sorted(everything[::2].tolist()) and alloc.available() == 0


def test_best_fit_keeps_the_long_runs():
    alloc = SlotAllocator(200, CPU)
    alloc.alloc(199)
    alloc.free(torch.arange(10, 14))  # a run of 4
    alloc.free(torch.arange(100, 180))  # a run of 80
    assert alloc.alloc(3).tolist() == [10, 11, 12]  # the short run, not the head of the long one
    assert alloc.alloc(60).tolist() == list(range(100, 160))


def test_random_operations_keep_every_slot_exactly_once():
    rng = random.Random(0)
    num_slots, rows = 300, 6
    alloc = SlotAllocator(num_slots, CPU, max_rows=rows)
    held: dict[int, list[int]] = {row: [] for row in range(rows)}
    loose: list[int] = []  # slots freed later in any order (as the radix tree frees evicted prefixes)
    for _ in range(3000):
        op = rng.random()
        if op < 0.6:
            batch = rng.sample(range(rows), rng.randrange(1, rows + 1))
            counts = [rng.choice([1, 1, 1, rng.randrange(1, 40)]) for _ in batch]
            got = alloc.alloc_rows(batch, counts, [rng.randrange(0, 64) for _ in batch])
            if got is None:
                assert sum(counts) > alloc.available()
                continue
            for row, part in zip(batch, got.split(counts)):
                held[row] += part.tolist()
        elif op < 0.8:
            row = rng.randrange(rows)
            alloc.release(row)
            keep = rng.randrange(len(held[row]) + 1)  # the head goes to the "tree", the rest is freed
            loose += held[row][:keep]
            alloc.free(torch.tensor(held[row][keep:], dtype=torch.int64))
            held[row] = []
        elif loose:
            rng.shuffle(loose)
            cut = rng.randrange(len(loose) + 1)
            alloc.free(torch.tensor(loose[:cut], dtype=torch.int64))
            loose = loose[cut:]
        in_use = [s for seq in held.values() for s in seq] + loose
        assert len(set(in_use)) == len(in_use) and 0 not in in_use
        assert not alloc._free[in_use].any()
        reserved = num_slots - 1 - len(in_use) - int(np.count_nonzero(alloc._free))
        assert alloc.available() == num_slots - 1 - len(in_use) and reserved >= 0

"""Paged KV storage: one K and one V tensor per layer, addressed by token-granular slots."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


class SlotAllocator:
    """Hands out KV slot indices, keeping each request's slots in runs of consecutive slots. Slot 0 is
    reserved as the write target for padding.

    Attention reads a sequence's keys and values slot by slot, and consecutive slots stream from
    memory while scattered ones do not: decode attention over 64 sequences of 448 keys (default model,
    Zen 4, benchmarks/kv_layout.py) takes 44 ms with the slots consecutive, 60 ms in runs of 64, 79 ms
    interleaved between sequences and 88 ms scattered. So an allocation for a request (a row) continues right
    after its previous slots: it takes a fresh run best-fit from the free runs and keeps the run's
    tail as the row's reservation, which its next tokens (the decode steps) use first. Reserved slots
    still count as available: the prefix cache is evicted to keep them (`make_room`), and when that
    is not enough they are given up.
    """

    def __init__(self, num_slots: int, device: torch.device, max_rows: int = 0):
        self.num_slots = num_slots
        self.device = device
        self.max_rows = max_rows
        self.clear()

    def clear(self) -> None:
        self._free = np.ones(self.num_slots, dtype=np.bool_)
        self._free[0] = False
        self._num_free = self.num_slots - 1
        self._res_start = [0] * self.max_rows  # row → its reserved run [start, start + len)
        self._res_len = [0] * self.max_rows
        self._reserved = 0

    def available(self) -> int:
        return self._num_free + self._reserved

    def unreserved(self) -> int:
        return self._num_free

    def alloc(self, n: int) -> torch.Tensor | None:
        """n free slots for no particular row, or None when fewer than n are available."""
        return self.alloc_rows([-1], [n], [0])

    def alloc_rows(self, rows: Sequence[int], counts: Sequence[int], reserve: Sequence[int],
                   make_room: Callable[[int], object] | None = None) -> torch.Tensor | None:
        """counts[i] slots for row rows[i] (-1: none), in that order, each row's continuing its
        reservation; reserve[i]: slots to keep reserved after them for the row's next tokens. None when
        fewer slots than sum(counts) are available (the caller evicts or preempts first).
        make_room(n) may free up to n more slots (the prefix cache's eviction) for the reservations."""
        if sum(counts) > self.available():
            return None
        pieces: list[list[tuple[int, int]]] = [[] for _ in counts]  # per entry: (start, length) runs
        fresh = []  # (entry, row, slots still needed, reservation wanted)
        for i, (row, n, r) in enumerate(zip(rows, counts, reserve)):
            if row >= 0 and self._res_len[row] and n:
                take = min(n, self._res_len[row])
                pieces[i].append((self._res_start[row], take))
                self._res_start[row] += take
                self._res_len[row] -= take
                self._reserved -= take
                n -= take
            if n:
                fresh.append((i, row, n, r if row >= 0 else 0))
        if fresh:
            need = sum(f[2] for f in fresh)
            short = need + sum(f[3] for f in fresh) - self._num_free
            if short > 0 and make_room is not None:
                make_room(short)
            if need > self._num_free:
                self._drop_reservations()
            self._carve(fresh, pieces, self._num_free - need)
        starts = np.array([s for p in pieces for s, _ in p], dtype=np.int64)
        lens = np.array([n for p in pieces for _, n in p], dtype=np.int64)
        ends = np.cumsum(lens)
        slots = np.repeat(starts - (ends - lens), lens) + np.arange(int(ends[-1]) if len(ends) else 0)
        return torch.from_numpy(slots).to(self.device)

    def _carve(self, fresh: list[tuple[int, int, int, int]], pieces: list[list[tuple[int, int]]], spare: int) -> None:
        """Take each fresh need (plus its reservation, while `spare` free slots remain beyond the needs)
        from the free runs: best fit, else the largest run, else the largest runs in turn."""
        edges = np.diff(self._free.view(np.int8), prepend=np.int8(0), append=np.int8(0))
        run_start = np.flatnonzero(edges == 1)
        run_len = np.flatnonzero(edges == -1) - run_start
        taken = []
        for i, row, n, r in fresh:
            r = max(0, min(r, spare))
            fits = np.flatnonzero(run_len >= n + r)
            if len(fits):
                k = fits[np.argmin(run_len[fits])]
            else:
                k = int(np.argmax(run_len))
                r = max(0, min(r, int(run_len[k]) - n))
            while n:
                start, m = int(run_start[k]), min(n + r, int(run_len[k]))
                run_start[k] += m
                run_len[k] -= m
                taken.append((start, m))
                got = min(n, m)
                pieces[i].append((start, got))
                n -= got
                if n:
                    k = int(np.argmax(run_len))
            if r:
                self._res_start[row], self._res_len[row] = start + got, r
                self._reserved += r
                spare -= r
        for start, m in taken:
            self._free[start:start + m] = False
            self._num_free -= m

    def _drop_reservations(self) -> None:
        for row, n in enumerate(self._res_len):
            if n:
                self._release_run(row)

    def release(self, row: int) -> None:
        """The row's request is done: its reservation becomes free again."""
        if self._res_len[row]:
            self._release_run(row)

    def _release_run(self, row: int) -> None:
        start, n = self._res_start[row], self._res_len[row]
        self._free[start:start + n] = True
        self._num_free += n
        self._reserved -= n
        self._res_len[row] = 0

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            index = slots.cpu().numpy()
            if self._free[index].any():
                raise RuntimeError("KV slot freed twice: a bookkeeping bug")
            self._free[index] = True
            self._num_free += len(index)


class KVPool:
    """K and V tensors [layers, kv_heads, slots, head_dim] plus each running request's slot table.

    Head-major, so that the keys a step gathers form one contiguous [tokens, head_dim] block per KV
    head: attention's batched matmuls then read them in place instead of copying strided views.

    Slots are allocated at token granularity; a request's KV lives wherever its slots are, and its row
    in `req_to_token` lists them in sequence order. Only slot 0 needs zeroing: attention reads other
    slots only after they were written (gathers past a sequence's length land on slot 0 or on slots
    written earlier, and are masked).
    """

    def __init__(self, num_slots: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 max_rows: int, max_context: int, dtype: torch.dtype, device: torch.device):
        shape = (num_layers, num_kv_heads, num_slots, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.k[:, :, 0].zero_()
        self.v[:, :, 0].zero_()
        self.slots = SlotAllocator(num_slots, device, max_rows)
        self.req_to_token = torch.zeros((max_rows, max_context), dtype=torch.int64, device=device)
        self._free_rows = list(range(max_rows - 1, -1, -1))

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize

    def alloc_row(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)

    def free_rows(self) -> int:
        return len(self._free_rows)

"""Paged KV storage: one K and one V tensor per layer, addressed by token-granular slots."""
from __future__ import annotations

import torch


class SlotAllocator:
    """Hands out KV slot indices. Slot 0 is reserved as the write target for padding."""

    def __init__(self, num_slots: int, device: torch.device):
        self.num_slots = num_slots
        self.device = device
        self.clear()

    def clear(self) -> None:
        self._free = torch.arange(1, self.num_slots, dtype=torch.int64, device=self.device)

    def available(self) -> int:
        return int(self._free.numel())

    def alloc(self, n: int) -> torch.Tensor | None:
        """n free slots, or None when fewer than n are free (the caller evicts or preempts)."""
        if n > self._free.numel():
            return None
        out, self._free = self._free[:n], self._free[n:]
        return out

    def free(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self._free = torch.cat([self._free, slots.to(torch.int64)])


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
        self.slots = SlotAllocator(num_slots, device)
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

"""Stacked LoRA weights on the model's device: one slot per adapter of a batch, attached as hooks
(lora.ops.LoRAHook) to the model's targeted linears. Slots are reassigned least-recently-used first
(pinned adapters last)."""
from __future__ import annotations

import itertools

import torch
from torch import nn

from radixserve.lora.adapter import LinearLayout, LoRAAdapter
from radixserve.lora.ops import LoRAHook


class LoRABuffers:
    def __init__(self, model: nn.Module, layout: dict[str, LinearLayout], num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device, pack: bool = False):
        """model: its model.layers[i].<name> for each linear name of the layout gets a hook, as its `lora`
        attribute. pack: keep packed copies of the buffers (see LoRAHook)."""
        self.num_slots, self.max_rank = num_slots, max_rank
        self.hooks: dict[tuple[int, str], LoRAHook] = {}
        for i, layer in enumerate(model.layers):
            for name, lay in layout.items():
                rows = max_rank * len(lay.pieces)
                a = torch.zeros(num_slots, rows, lay.in_features, dtype=dtype, device=device)
                b = torch.zeros(num_slots, rows, lay.out_features, dtype=dtype, device=device)
                hook = LoRAHook(name, a, b, len(lay.pieces), pack)
                getattr(layer, name).lora = hook
                self.hooks[(i, name)] = hook
        self.slot_of: dict[int, int] = {}  # adapter id → slot
        self._owner: list[int | None] = [None] * num_slots
        self._last_use = [0] * num_slots
        self._clock = itertools.count(1)

    def nbytes(self) -> int:
        """The stacked weights and their packed copies."""
        return sum(t.numel() * t.element_size() for hook in self.hooks.values() for t in hook.tensors())

    def assign(self, adapters: dict[int, LoRAAdapter], pinned: set[int]) -> dict[int, int]:
        """Slots for this step's adapters (at most num_slots), copying in those not already there."""
        if len(adapters) > self.num_slots:
            raise RuntimeError(f"{len(adapters)} adapters in one batch exceed the {self.num_slots} LoRA slots: "
                               f"scheduler bug")
        now = next(self._clock)
        for lid in adapters:
            if lid in self.slot_of:
                self._last_use[self.slot_of[lid]] = now
        for lid, adapter in adapters.items():
            if lid in self.slot_of:
                continue
            slot = self._victim(set(adapters), pinned)
            self.release(self._owner[slot])
            self._write(slot, adapter)
            self.slot_of[lid], self._owner[slot], self._last_use[slot] = slot, lid, now
        return {lid: self.slot_of[lid] for lid in adapters}

    def _victim(self, keep: set[int], pinned: set[int]) -> int:
        """The lowest free slot, else the least recently used one of an adapter outside this step,
        unpinned first."""
        candidates = [s for s, owner in enumerate(self._owner) if owner not in keep]
        return min(candidates, key=lambda s: (self._owner[s] is not None, self._owner[s] in pinned,
                                              self._last_use[s] if self._owner[s] is not None else s))

    def release(self, lid: int | None) -> None:
        """Forget an adapter's slot (its weights stay until overwritten, and are never read meanwhile)."""
        slot = self.slot_of.pop(lid, None) if lid is not None else None
        if slot is not None:
            self._owner[slot] = None

    @torch.no_grad()
    def _write(self, slot: int, adapter: LoRAAdapter) -> None:
        for key, hook in self.hooks.items():
            a, b, w = hook.a, hook.b, adapter.weights.get(key)
            if w is None:
                a[slot].zero_()
                b[slot].zero_()
            else:
                rows = w[0].shape[0]
                # Rows past the adapter's rank stay zero: a step computes up to its largest adapter's rank.
                a[slot, :rows].copy_(w[0], non_blocking=True)
                a[slot, rows:].zero_()
                b[slot, :rows].copy_(w[1], non_blocking=True)
                b[slot, rows:].zero_()
            hook.repack()


def lora_shape(args, initial_configs: list[tuple[str, dict]]) -> tuple[int, tuple[str, ...]]:
    """(max rank, target modules) of the buffers: the flags, else what the start-up adapters need
    (rank 16 and every projection without any)."""
    from radixserve.lora.adapter import config_targets
    from radixserve.lora.refs import TARGET_MODULES, parse_target_modules

    targets = parse_target_modules(args.lora_target_modules)
    if targets is None:
        found = {t for path, cfg in initial_configs for t in config_targets(path, cfg)}
        targets = tuple(t for t in TARGET_MODULES if t in found) if found else TARGET_MODULES
    rank = args.max_lora_rank or max((cfg["r"] for _, cfg in initial_configs), default=16)
    return rank, targets

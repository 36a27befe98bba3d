"""The engine's adapter registry: names → ids, weights kept in memory (at most --max-loaded-loras, LRU,
pinned ones never evicted), the requests using each adapter, unloads that wait for them, and the
buffer slots of each step's adapters."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from radixserve.lora.adapter import LinearLayout, LoRAAdapter, LoRAError, linear_of, load_adapter
from radixserve.lora.buffers import LoRABuffers
from radixserve.lora.refs import LoRANotFoundError, LoRARef

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    id: int
    name: str
    path: str
    pinned: bool
    rank: int
    linears: frozenset[str]  # the model's linears it targets
    adapter: LoRAAdapter | None  # None: evicted from memory, reloaded from path when asked again
    refs: int = 0  # requests submitted and not finished
    last_use: int = 0
    unloading: bool = False


class LoRAManager:
    def __init__(self, num_layers: int, buffers: LoRABuffers, layout: dict[str, LinearLayout], dtype: torch.dtype,
                 max_per_batch: int, max_loaded: int | None = None, initial: list[LoRARef] = ()):
        """num_layers: the base model's decoder layers (an adapter's weights must fall within them);
        max_per_batch / max_loaded: --max-loras-per-batch / --max-loaded-loras; initial: --lora-paths."""
        self.num_layers, self.buffers, self.layout, self.dtype = num_layers, buffers, layout, dtype
        self._linear_of = linear_of(layout)
        self.max_rank = buffers.max_rank
        self.max_per_batch, self.max_loaded = max_per_batch, max_loaded
        self.entries: dict[int, _Entry] = {}  # every adapter still registered or waiting to unload
        self.by_name: dict[str, int] = {}  # the adapters requests may use
        self._ids = itertools.count(1)  # never reused: an id also names the adapter's prefix cache
        self._clock = itertools.count(1)
        for ref in initial:
            self.load(ref.name, ref.path, ref.pinned)

    # ---- registry
    def load(self, name: str, path: str, pinned: bool = False) -> int:
        """Read, validate and register an adapter; its id. Raises LoRAError (bad files, name taken)."""
        if name in self.by_name:
            raise LoRAError(f"a LoRA adapter named {name!r} is already loaded (unload it first)")
        if pinned and sum(e.pinned for e in self._live()) + 1 >= self.max_per_batch:
            raise LoRAError(f"cannot pin {name!r}: pinned adapters must leave a batch slot to the others "
                            f"(fewer than --max-loras-per-batch {self.max_per_batch})")
        start = time.perf_counter()
        adapter = self._read(path)
        lid = next(self._ids)
        linears = frozenset(self._linear_of[t] for t in adapter.targets)
        self.entries[lid] = _Entry(lid, name, path, pinned, adapter.rank, linears, adapter, last_use=next(self._clock))
        self.by_name[name] = lid
        logger.info("loaded LoRA adapter %r from %s (rank %d, %s) in %.2fs", name, path, adapter.rank,
                    ", ".join(adapter.targets), time.perf_counter() - start)
        self._evict_idle()
        return lid

    def _read(self, path: str) -> LoRAAdapter:
        return load_adapter(path, self.num_layers, self.layout, self.max_rank, self.dtype)

    def _live(self) -> list[_Entry]:
        return [self.entries[i] for i in self.by_name.values()]

    def loaded(self) -> list[tuple[int, str, str, bool]]:
        """(id, name, path, pinned) of the adapters requests may use, in load order."""
        return [(e.id, e.name, e.path, e.pinned) for e in sorted(self._live(), key=lambda e: e.id)]

    def id_of(self, name: str) -> int:
        lid = self.by_name.get(name)
        if lid is None:
            raise LoRANotFoundError(f"LoRA adapter {name!r} is not loaded; loaded: "
                                    f"{', '.join(sorted(self.by_name)) or 'none'}")
        return lid

    def start_unload(self, name: str) -> tuple[int, bool]:
        """Stop accepting requests for the adapter; (its id, whether it is already gone). It goes once
        its last request finishes (release returns True then)."""
        lid = self.id_of(name)
        entry = self.entries[lid]
        entry.unloading = True
        del self.by_name[name]
        if entry.refs == 0:
            self._drop(lid)
            return lid, True
        return lid, False

    def _drop(self, lid: int) -> None:
        entry = self.entries.pop(lid)
        self.buffers.release(lid)
        logger.info("unloaded LoRA adapter %r", entry.name)

    # ---- requests
    def acquire(self, lid: int) -> None:
        """A request will use the adapter: count it, and bring its weights back if they were evicted."""
        entry = self.entries.get(lid)
        if entry is None or entry.unloading:
            raise LoRANotFoundError(f"LoRA adapter id {lid} is not loaded")
        if entry.adapter is None:
            try:
                entry.adapter = self._read(entry.path)
            except LoRAError as e:
                raise LoRAError(f"LoRA adapter {entry.name!r} could not be reloaded: {e}") from None
            # The folder may have changed since it was first loaded.
            entry.rank = entry.adapter.rank
            entry.linears = frozenset(self._linear_of[t] for t in entry.adapter.targets)
            logger.info("reloaded LoRA adapter %r", entry.name)
        entry.refs += 1
        entry.last_use = next(self._clock)
        self._evict_idle()

    def release(self, lid: int) -> bool:
        """A request of the adapter finished. True when that completes the adapter's unload."""
        entry = self.entries[lid]
        entry.refs -= 1
        if entry.unloading and entry.refs == 0:
            self._drop(lid)
            return True
        self._evict_idle()
        return False

    def _evict_idle(self) -> None:
        """Beyond --max-loaded-loras, drop the weights of the least recently used idle, unpinned adapters
        (adapters in use are kept even past the limit: their requests need them)."""
        if self.max_loaded is None:
            return
        resident = [e for e in self.entries.values() if e.adapter is not None]
        idle = sorted((e for e in resident if e.refs == 0 and not e.pinned), key=lambda e: e.last_use)
        for entry in idle[:max(0, len(resident) - self.max_loaded)]:
            entry.adapter = None
            self.buffers.release(entry.id)
            logger.info("evicted LoRA adapter %r from memory (--max-loaded-loras %d)", entry.name, self.max_loaded)

    # ---- steps
    def rank(self, lid: int) -> int:
        return self.entries[lid].rank

    def linears(self, ids: set[int]) -> frozenset[str]:
        """The linears some of these adapters target (the others skip LoRA in their step)."""
        return frozenset().union(*(self.entries[i].linears for i in ids))

    def prepare(self, ids: set[int]) -> dict[int, int]:
        """Buffer slots of a step's adapters (all in use, so in memory)."""
        pinned = {e.id for e in self.entries.values() if e.pinned}
        return self.buffers.assign({i: self.entries[i].adapter for i in sorted(ids)}, pinned)

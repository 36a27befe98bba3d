"""Radix tree from token-id prefixes to KV slots, for prefix reuse across requests."""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable, Sequence

import torch

from radixserve.cache.kv_pool import SlotAllocator


class TreeNode:
    """One edge of the radix tree: a run of tokens and the slots holding their KV."""

    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access")

    def __init__(
        self,
        key: tuple[int, ...],
        value: torch.Tensor,
        parent: TreeNode | None = None,
        last_access: float = 0.0,
    ):
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.key = key
        self.value = value
        self.lock_ref = 0
        self.last_access = last_access

    def __repr__(self) -> str:
        return f"TreeNode(len={len(self.key)}, lock_ref={self.lock_ref}, children={len(self.children)})"


def _common_prefix_len(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the shared prefix, using C-level tuple comparisons instead of a per-token loop."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    # Invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]; O(n log n) work but all inside tuple compare.
    lo, hi = 0, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class RadixCache:
    """Prefix cache over token-granular KV slots, with one tree per namespace (LoRA id / cache salt)."""

    def __init__(self, allocator: SlotAllocator, disable: bool = False):
        self.allocator = allocator
        self.disable = disable
        self._empty = torch.empty(0, dtype=torch.int64, device=allocator.device)
        # A logical clock instead of wall time: strictly ordered, so LRU ties cannot happen.
        self._clock = itertools.count(1)
        self._roots: dict[Hashable, TreeNode] = {}
        self._evictable = 0  # tokens in nodes with lock_ref == 0
        self._protected = 0  # tokens in nodes with lock_ref > 0

    # ---- bookkeeping -------------------------------------------------------------------

    def _root(self, namespace: Hashable) -> TreeNode:
        root = self._roots.get(namespace)
        if root is None:
            root = TreeNode((), self._empty)
            root.lock_ref = 1  # roots are never evictable
            self._roots[namespace] = root
        return root

    def _prune_roots(self) -> None:
        # Namespaced roots are cheap but unbounded in number (one per salt), so drop empty ones.
        for ns in [ns for ns, r in self._roots.items() if ns is not None and not r.children]:
            del self._roots[ns]

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        return self._evictable + self._protected

    def reset(self) -> None:
        """Drop every tree and free all slots it owns; refused while any node is locked."""
        if self._protected:
            raise RuntimeError(f"RadixCache.reset with {self._protected} locked tokens")
        owned = []
        for root in self._roots.values():
            stack = list(root.children.values())
            while stack:
                node = stack.pop()
                owned.append(node.value)
                stack.extend(node.children.values())
                node.parent = None  # stale handles must not touch the counters afterwards
        if owned:
            self.allocator.free(torch.cat(owned))
        self._roots = {}
        self._evictable = 0

    def drop_namespaces(self, which: Callable[[Hashable], bool]) -> int:
        """Free every unlocked cached prefix of the namespaces `which` selects (e.g. an unloaded LoRA
        adapter's, which no request can match again); returns the tokens freed."""
        freed = []
        for ns in [ns for ns in self._roots if which(ns)]:
            stack = list(self._roots[ns].children.values())
            leaves = []
            while stack:
                node = stack.pop()
                stack.extend(node.children.values())
                if not node.children:
                    leaves.append(node)
            for leaf in leaves:  # remove unlocked subtrees bottom-up; locked paths stay
                node = leaf
                while node.parent is not None and not node.children and node.lock_ref == 0:
                    parent = node.parent
                    del parent.children[node.key[0]]
                    node.parent = None
                    self._evictable -= len(node.key)
                    freed.append(node.value)
                    node = parent
        if freed:
            self.allocator.free(torch.cat(freed))
        self._prune_roots()
        return sum(len(v) for v in freed)

    # ---- lookup / insert ---------------------------------------------------------------

    def _split(self, node: TreeNode, at: int) -> TreeNode:
        """Cut node after `at` tokens; the new parent takes the head so `node` (which callers
        may hold) still ends at the same position in the tree."""
        parent = node.parent
        assert parent is not None and 0 < at < len(node.key)
        head = TreeNode(node.key[:at], node.value[:at], parent, node.last_access)
        head.lock_ref = node.lock_ref  # locks on node cover the whole path, so the head too
        parent.children[node.key[0]] = head
        node.key = node.key[at:]
        node.value = node.value[at:]
        node.parent = head
        head.children[node.key[0]] = node
        return head

    def match_prefix(
        self, key: Sequence[int], namespace: Hashable = None
    ) -> tuple[torch.Tensor, TreeNode]:
        """Longest cached prefix of key: (its slots, the node ending exactly at the match)."""
        if self.disable:
            # Nothing is ever stored, so one root serves every namespace (no per-salt growth).
            return self._empty, self._root(None)
        root = self._root(namespace)
        if not key:
            return self._empty, root
        key = tuple(key)
        now = next(self._clock)
        node, pos, parts = root, 0, []
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            n = len(child.key)
            seg = key[pos : pos + n]
            if seg == child.key:
                child.last_access = now
                parts.append(child.value)
                node, pos = child, pos + n
                continue
            m = _common_prefix_len(seg, child.key)  # >= 1: first token matched via the dict
            node = self._split(child, m)
            node.last_access = now  # only the matched head is touched, not the tail
            parts.append(node.value)
            pos += m
            break
        if not parts:
            return self._empty, root
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), node

    def insert(self, key: Sequence[int], value: torch.Tensor, namespace: Hashable = None) -> int:
        """Store key->value; returns how many leading tokens were already cached (the caller
        frees its own slots for those). The tree takes ownership of value[prefix:]."""
        if len(key) != value.numel():
            raise ValueError(f"key has {len(key)} tokens but value has {value.numel()} slots")
        if self.disable or not key:
            return 0
        key = tuple(key)
        now = next(self._clock)
        node, pos = self._root(namespace), 0
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                break
            n = len(child.key)
            seg = key[pos : pos + n]
            if seg == child.key:
                child.last_access = now
                node, pos = child, pos + n
                continue
            m = _common_prefix_len(seg, child.key)
            pos += m
            if pos == len(key):
                # key ends inside child: everything is already cached, no need to split.
                child.last_access = now
                return pos
            node = self._split(child, m)
            node.last_access = now
            break
        if pos < len(key):
            leaf = TreeNode(key[pos:], value[pos:].to(torch.int64), node, now)
            node.children[key[pos]] = leaf
            self._evictable += len(leaf.key)
        return pos

    # ---- locking -----------------------------------------------------------------------

    def inc_lock(self, node: TreeNode) -> None:
        """Pin node and its ancestors so eviction cannot free the slots a request is using."""
        while node.parent is not None:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock(self, node: TreeNode) -> None:
        while node.parent is not None:
            if node.lock_ref <= 0:
                raise RuntimeError("dec_lock on a node that is not locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected -= len(node.key)
                self._evictable += len(node.key)
            node = node.parent

    # ---- eviction ----------------------------------------------------------------------

    def evict(self, num_tokens: int) -> int:
        """Free at least num_tokens slots (if possible) from unlocked leaves, oldest first."""
        self._prune_roots()
        if num_tokens <= 0 or self._evictable == 0:
            return 0
        tie = itertools.count()  # heap tiebreak so TreeNodes are never compared
        heap = []
        for root in self._roots.values():
            stack = list(root.children.values())
            while stack:
                node = stack.pop()
                if node.children:
                    stack.extend(node.children.values())
                elif node.lock_ref == 0:
                    heap.append((node.last_access, next(tie), node))
        heapq.heapify(heap)
        freed, released = 0, []
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            released.append(node.value)
            freed += len(node.key)
            self._evictable -= len(node.key)
            del parent.children[node.key[0]]
            node.parent = None  # a stale handle must not lock the live ancestors later
            if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, next(tie), parent))
        if released:
            self.allocator.free(torch.cat(released))
            self._prune_roots()
        return freed

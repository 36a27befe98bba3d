"""Unit tests for the radix prefix cache."""
from __future__ import annotations

import random

import pytest
import torch

from radixserve.cache.kv_pool import SlotAllocator
from radixserve.cache.radix_cache import RadixCache, TreeNode, _common_prefix_len

CPU = torch.device("cpu")


def make(num_slots: int = 128, disable: bool = False) -> tuple[SlotAllocator, RadixCache]:
    alloc = SlotAllocator(num_slots, CPU)
    return alloc, RadixCache(alloc, disable=disable)


def put(cache: RadixCache, alloc: SlotAllocator, key: list[int], ns=None) -> tuple[torch.Tensor, int]:
    """Insert like the scheduler does: allocate, insert, free our duplicates of the cached prefix."""
    slots = alloc.alloc(len(key))
    assert slots is not None
    p = cache.insert(key, slots, ns)
    alloc.free(slots[:p])
    return slots, p


def path_key(node: TreeNode) -> tuple[int, ...]:
    parts = []
    while node.parent is not None:
        parts.append(tuple(node.key))
        node = node.parent
    return tuple(t for part in reversed(parts) for t in part)


def walk(cache: RadixCache, ns=None) -> tuple[dict[tuple[int, ...], int], list[TreeNode]]:
    """Brute force: every cached prefix -> slot of its last token, plus every non-root node."""
    root = cache.match_prefix([], ns)[1]
    prefixes: dict[tuple[int, ...], int] = {}
    nodes = []
    stack = [(child, ()) for child in root.children.values()]
    while stack:
        node, before = stack.pop()
        assert len(node.key) == node.value.numel() > 0
        assert node.value.dtype == torch.int64
        assert node.parent.children[node.key[0]] is node
        nodes.append(node)
        for i, (tok, slot) in enumerate(zip(node.key, node.value.tolist())):
            prefixes[before + tuple(node.key[: i + 1])] = slot
        full = before + tuple(node.key)
        stack.extend((c, full) for c in node.children.values())
    return prefixes, nodes


def check_sizes(cache: RadixCache, namespaces=(None,)) -> None:
    locked = unlocked = 0
    for ns in namespaces:
        for node in walk(cache, ns)[1]:
            if node.lock_ref > 0:
                locked += len(node.key)
            else:
                unlocked += len(node.key)
    assert cache.protected_size() == locked
    assert cache.evictable_size() == unlocked
    assert cache.total_size() == locked + unlocked


def test_match_on_empty_tree():
    _, cache = make()
    slots, node = cache.match_prefix([1, 2, 3])
    assert slots.dtype == torch.int64 and slots.numel() == 0
    assert node.parent is None and node.lock_ref >= 0
    assert cache.match_prefix([])[0].numel() == 0
    assert cache.total_size() == 0


def test_insert_then_full_and_partial_match():
    alloc, cache = make()
    slots, p = put(cache, alloc, [1, 2, 3, 4, 5, 6])
    assert p == 0
    got, node = cache.match_prefix([1, 2, 3, 4, 5, 6])
    assert torch.equal(got, slots) and path_key(node) == (1, 2, 3, 4, 5, 6)
    got, node = cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8])
    assert torch.equal(got, slots)
    got, node = cache.match_prefix([1, 2, 3, 9])
    assert torch.equal(got, slots[:3]) and path_key(node) == (1, 2, 3)
    got, node = cache.match_prefix([9, 1])
    assert got.numel() == 0 and node.parent is None
    check_sizes(cache)


def test_insert_returns_already_present_prefix():
    alloc, cache = make(64)
    slots, _ = put(cache, alloc, [1, 2, 3, 4, 5])
    assert alloc.available() == 63 - 5
    # Duplicate insert: everything present, nothing new stored, caller's slots all freed.
    _, p = put(cache, alloc, [1, 2, 3, 4, 5])
    assert p == 5 and cache.total_size() == 5 and alloc.available() == 63 - 5
    # Shorter key ending inside a node.
    _, p = put(cache, alloc, [1, 2])
    assert p == 2 and cache.total_size() == 5
    # Overlapping insert diverging after 3 tokens keeps the tree's slots for the shared part.
    new, p = put(cache, alloc, [1, 2, 3, 7, 8])
    assert p == 3 and cache.total_size() == 7 and alloc.available() == 63 - 7
    got, _ = cache.match_prefix([1, 2, 3, 7, 8])
    assert torch.equal(got, torch.cat([slots[:3], new[3:]]))
    # Extension of an existing key.
    ext, p = put(cache, alloc, [1, 2, 3, 4, 5, 6])
    assert p == 5
    assert torch.equal(cache.match_prefix([1, 2, 3, 4, 5, 6])[0], torch.cat([slots, ext[5:]]))
    check_sizes(cache)


def test_insert_rejects_length_mismatch():
    _, cache = make()
    with pytest.raises(ValueError):
        cache.insert([1, 2, 3], torch.tensor([1, 2], dtype=torch.int64))


def test_splits_keep_every_slot():
    alloc, cache = make(256)
    keys = [
        [5, 6, 7, 8, 9, 10, 11, 12],
        [5, 6, 7, 8, 1, 2],          # diverges mid-node
        [5, 6, 9],                   # diverges inside the new head
        [5, 6, 7, 8, 9, 10, 11, 12, 13],
        [4],
        [5, 6, 7, 8, 1, 3, 3],
    ]
    expected: dict[tuple[int, ...], torch.Tensor] = {}
    for key in keys:
        slots, p = put(cache, alloc, key)
        prev = cache.match_prefix(key[:p])[0] if p else slots[:0]
        expected[tuple(key)] = torch.cat([prev, slots[p:]])
    # Matches ending mid-node split nodes; the returned node covers exactly the prefix.
    for cut in ([5, 6, 7], [5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 1, 3]):
        got, node = cache.match_prefix(cut + [99])
        assert path_key(node) == tuple(cut)
        owner = next(k for k in expected if k[: len(cut)] == tuple(cut))
        assert torch.equal(got, expected[owner][: len(cut)])
    for key, slots in expected.items():
        got, node = cache.match_prefix(list(key))
        assert torch.equal(got, slots), key
        assert path_key(node) == key
    prefixes, nodes = walk(cache)
    assert len(set(prefixes.values())) == len(prefixes) == cache.total_size()
    check_sizes(cache)


def test_long_keys_diverging_late():
    alloc, cache = make(20000)
    base = list(range(100, 8292))  # 8192 tokens
    a, _ = put(cache, alloc, base)
    other = base[:5000] + [7] + base[5001:]
    b, p = put(cache, alloc, other)
    assert p == 5000
    assert torch.equal(cache.match_prefix(base)[0], a)
    assert torch.equal(cache.match_prefix(other)[0], torch.cat([a[:5000], b[5000:]]))
    got, node = cache.match_prefix(base[:4321] + [1])
    assert torch.equal(got, a[:4321]) and len(path_key(node)) == 4321


def test_common_prefix_len_matches_brute_force():
    rng = random.Random(0)
    for _ in range(500):
        a = tuple(rng.randrange(3) for _ in range(rng.randrange(0, 40)))
        b = a[: rng.randrange(0, len(a) + 1)] + tuple(rng.randrange(3) for _ in range(rng.randrange(0, 10)))
        want = 0
        while want < min(len(a), len(b)) and a[want] == b[want]:
            want += 1
        assert _common_prefix_len(a, b) == want == _common_prefix_len(b, a)


def test_namespaces_are_isolated():
    alloc, cache = make()
    s_default, _ = put(cache, alloc, [1, 2, 3])
    assert cache.match_prefix([1, 2, 3], "lora-a")[0].numel() == 0
    s_a, p = put(cache, alloc, [1, 2, 3], "lora-a")
    assert p == 0
    assert torch.equal(cache.match_prefix([1, 2, 3], "lora-a")[0], s_a)
    assert torch.equal(cache.match_prefix([1, 2, 3])[0], s_default)
    assert cache.match_prefix([1, 2, 3], ("salt", 7))[0].numel() == 0
    assert cache.total_size() == 6
    # Evicting a namespace's whole tree leaves it usable.
    cache.evict(6)
    assert cache.total_size() == 0 and alloc.available() == 127
    s_a2, p = put(cache, alloc, [1, 2], "lora-a")
    assert p == 0 and torch.equal(cache.match_prefix([1, 2, 3], "lora-a")[0], s_a2)


def test_drop_namespaces_frees_only_their_unlocked_prefixes():
    """An unloaded LoRA adapter's cached prefixes are freed at once; other namespaces and locked paths stay."""
    alloc, cache = make(64)
    keep, _ = put(cache, alloc, [1, 2, 3])
    put(cache, alloc, [1, 2, 3], ("lora", 1, None))
    put(cache, alloc, [1, 2, 4, 5], ("lora", 1, None))
    put(cache, alloc, [9, 9], ("lora", 1, "salt"))
    put(cache, alloc, [7], ("lora", 2, None))
    _, node = cache.match_prefix([7], ("lora", 2, None))
    cache.inc_lock(node)
    assert cache.total_size() == 3 + 5 + 2 + 1
    freed = cache.drop_namespaces(lambda ns: isinstance(ns, tuple) and ns[:2] == ("lora", 1))
    assert freed == 7 and cache.total_size() == 4 and alloc.available() == 63 - 4
    assert torch.equal(cache.match_prefix([1, 2, 3])[0], keep)
    assert cache.match_prefix([1, 2, 3], ("lora", 1, None))[0].numel() == 0
    assert cache.drop_namespaces(lambda ns: ns == ("lora", 2, None)) == 0  # locked: kept
    cache.dec_lock(node)
    assert cache.drop_namespaces(lambda ns: ns == ("lora", 2, None)) == 1
    assert cache.total_size() == 3 and cache.evictable_size() == 3


def test_lock_prevents_eviction_until_unlocked():
    alloc, cache = make(64)
    put(cache, alloc, [1, 2, 3])
    put(cache, alloc, [1, 2, 4, 5])
    slots, node = cache.match_prefix([1, 2, 3])
    cache.inc_lock(node)
    assert cache.protected_size() == 3 and cache.evictable_size() == 2
    check_sizes(cache)
    assert cache.evict(100) == 2  # only the unlocked [4, 5] branch goes
    assert torch.equal(cache.match_prefix([1, 2, 3])[0], slots)
    assert cache.evict(100) == 0
    cache.inc_lock(node)  # nested locks need matching unlocks
    cache.dec_lock(node)
    assert cache.evict(100) == 0 and cache.protected_size() == 3
    cache.dec_lock(node)
    assert cache.protected_size() == 0 and cache.evictable_size() == 3
    assert cache.evict(1) == 1  # the [3] leaf is enough
    assert cache.match_prefix([1, 2, 3])[0].numel() == 2
    assert cache.evict(1) == 2  # [1, 2] became a leaf once its last child went
    assert cache.total_size() == 0 and alloc.available() == 63


def test_dec_lock_on_unlocked_node_raises():
    alloc, cache = make()
    put(cache, alloc, [1, 2])
    _, node = cache.match_prefix([1, 2])
    with pytest.raises(RuntimeError):
        cache.dec_lock(node)


def test_lock_survives_split():
    alloc, cache = make()
    put(cache, alloc, [1, 2, 3, 4, 5, 6])
    _, node = cache.match_prefix([1, 2, 3, 4, 5, 6])
    cache.inc_lock(node)
    cache.match_prefix([1, 2, 3])  # splits the locked node
    put(cache, alloc, [1, 2, 3, 4, 9])  # splits it again
    check_sizes(cache)
    assert cache.protected_size() == 6 and cache.evictable_size() == 1
    assert cache.evict(10) == 1
    cache.dec_lock(node)
    assert cache.protected_size() == 0 and cache.evictable_size() == 6
    check_sizes(cache)


def test_lru_evicts_oldest_leaf_first():
    alloc, cache = make()
    a, _ = put(cache, alloc, [1, 2, 3])
    b, _ = put(cache, alloc, [4, 5, 6])
    assert cache.evict(1) == 3
    assert cache.match_prefix([1, 2, 3])[0].numel() == 0
    assert torch.equal(cache.match_prefix([4, 5, 6])[0], b)


def test_match_refreshes_lru():
    alloc, cache = make()
    a, _ = put(cache, alloc, [1, 2, 3])
    put(cache, alloc, [4, 5, 6])
    put(cache, alloc, [7, 8])
    cache.match_prefix([1, 2, 3])
    assert cache.evict(1) == 3  # [4,5,6] is now the oldest
    assert cache.match_prefix([4, 5, 6])[0].numel() == 0
    assert torch.equal(cache.match_prefix([1, 2, 3])[0], a)
    assert cache.evict(1) == 2  # [7,8] older than the re-matched [1,2,3]
    assert torch.equal(cache.match_prefix([1, 2, 3])[0], a)


def test_evict_returns_slots_to_allocator():
    alloc, cache = make(32)
    put(cache, alloc, [1, 2, 3, 4])
    put(cache, alloc, [1, 2, 5, 6])
    put(cache, alloc, [9, 9])
    assert alloc.available() == 31 - 8 and cache.total_size() == 8
    freed = cache.evict(3)
    assert freed >= 3 and alloc.available() == 31 - 8 + freed
    assert cache.total_size() == 8 - freed
    freed2 = cache.evict(100)
    assert freed + freed2 == 8 and alloc.available() == 31 and cache.total_size() == 0
    assert cache.evict(5) == 0
    # Freed slots are real and reusable.
    assert alloc.alloc(31) is not None


def test_disabled_cache_stores_nothing():
    alloc, cache = make(disable=True)
    slots = alloc.alloc(3)
    assert cache.insert([1, 2, 3], slots) == 0
    got, node = cache.match_prefix([1, 2, 3])
    assert got.numel() == 0 and node.parent is None
    assert cache.match_prefix([1], "ns")[0].numel() == 0
    cache.inc_lock(node)
    cache.dec_lock(node)
    assert cache.total_size() == cache.evictable_size() == cache.protected_size() == 0
    assert cache.evict(10) == 0 and alloc.available() == 127 - 3


def test_reset_frees_everything_and_refuses_when_locked():
    alloc, cache = make(64)
    put(cache, alloc, [1, 2, 3])
    put(cache, alloc, [1, 2, 4], "ns")
    _, node = cache.match_prefix([1, 2, 3])
    cache.inc_lock(node)
    with pytest.raises(RuntimeError):
        cache.reset()
    assert cache.total_size() == 6
    cache.dec_lock(node)
    cache.reset()
    assert cache.total_size() == cache.evictable_size() == 0 and alloc.available() == 63
    assert cache.match_prefix([1, 2, 3])[0].numel() == 0
    assert cache.match_prefix([1, 2, 4], "ns")[0].numel() == 0
    put(cache, alloc, [1, 2, 3])
    assert cache.total_size() == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_against_reference(seed: int):
    rng = random.Random(seed)
    num_slots = 160
    alloc, cache = make(num_slots)
    namespaces = (None, "lora")
    ref: dict = {ns: {} for ns in namespaces}  # ns -> {prefix tuple: slot of its last token}
    inserted: dict = {ns: [] for ns in namespaces}
    locks: list[tuple[TreeNode, object, tuple[int, ...]]] = []

    def expected_match(ns, key):
        m = 0
        while m < len(key) and tuple(key[: m + 1]) in ref[ns]:
            m += 1
        return m, [ref[ns][tuple(key[: i + 1])] for i in range(m)]

    def random_key(ns):
        if inserted[ns] and rng.random() < 0.7:
            base = rng.choice(inserted[ns])
            key = list(base[: rng.randrange(0, len(base) + 1)])
        else:
            key = []
        key += [rng.randrange(3) for _ in range(rng.randrange(0 if key else 1, 8))]
        return key

    def sync_after_evict(freed: int) -> None:
        removed = 0
        for ns in namespaces:
            now, _ = walk(cache, ns)
            assert all(ref[ns].get(k) == v for k, v in now.items())
            removed += len(ref[ns]) - len(now)
            ref[ns] = now
        assert removed == freed
        for node, ns, prefix in locks:
            assert expected_match(ns, list(prefix))[0] == len(prefix)

    def check() -> None:
        lock_count: dict[int, int] = {}
        for node, _, _ in locks:
            while node.parent is not None:
                lock_count[id(node)] = lock_count.get(id(node), 0) + 1
                node = node.parent
        all_slots, locked, unlocked = [], 0, 0
        for ns in namespaces:
            prefixes, nodes = walk(cache, ns)
            assert prefixes == ref[ns]
            all_slots += prefixes.values()
            for node in nodes:
                assert node.lock_ref == lock_count.get(id(node), 0)
                if node.lock_ref:
                    locked += len(node.key)
                else:
                    unlocked += len(node.key)
        assert len(set(all_slots)) == len(all_slots) == cache.total_size()
        assert all(0 < s < num_slots for s in all_slots)
        assert (cache.protected_size(), cache.evictable_size()) == (locked, unlocked)
        assert alloc.available() + cache.total_size() == num_slots - 1

    for _ in range(400):
        ns = rng.choice(namespaces)
        op = rng.random()
        if op < 0.45:
            key = random_key(ns)
            slots = alloc.alloc(len(key))
            if slots is None:
                before = alloc.available()
                freed = cache.evict(len(key) - before)
                assert alloc.available() == before + freed
                sync_after_evict(freed)
                slots = alloc.alloc(len(key))
                if slots is None:
                    continue
            want, _ = expected_match(ns, key)
            p = cache.insert(key, slots, ns)
            assert p == want
            alloc.free(slots[:p])
            for i in range(p, len(key)):
                ref[ns][tuple(key[: i + 1])] = int(slots[i])
            inserted[ns].append(tuple(key))
        elif op < 0.75:
            key = random_key(ns)
            m, want = expected_match(ns, key)
            got, node = cache.match_prefix(key, ns)
            assert got.tolist() == want
            assert path_key(node) == tuple(key[:m])
            if op < 0.6 and m:
                cache.inc_lock(node)
                locks.append((node, ns, tuple(key[:m])))
        elif op < 0.87:
            if locks:
                node, _, _ = locks.pop(rng.randrange(len(locks)))
                cache.dec_lock(node)
        else:
            n = rng.randrange(1, 30)
            before_avail, before_evictable = alloc.available(), cache.evictable_size()
            freed = cache.evict(n)
            assert freed >= min(n, before_evictable)
            assert alloc.available() == before_avail + freed
            sync_after_evict(freed)
        check()

    while locks:
        cache.dec_lock(locks.pop()[0])
    cache.evict(num_slots)
    assert cache.total_size() == 0 and alloc.available() == num_slots - 1

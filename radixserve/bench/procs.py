"""A server's processes as Linux /proc shows them: its process tree, their memory and CPU time (what the
benchmarks measure a server by, from outside)."""
from __future__ import annotations

import os
from collections import defaultdict


def _parents() -> dict[int, list[int]]:
    """Every live process's children, by parent pid."""
    children = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry))  # comm may hold spaces/parens
    return children


def child_pids(pid: int) -> list[int]:
    return list(_parents().get(pid, ()))


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    children = _parents()
    tree = [pid]
    for p in tree:  # grows while walked: breadth first
        tree.extend(children.get(p, ()))
    return tree


def _kib(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def tree_memory_mib(pid: int) -> tuple[float | None, str]:
    """The process tree's memory and how it was counted: PSS (shared pages split among their users, so
    the tree's sum counts them once), or RSS where smaps_rollup is unreadable; (None, "gone") after exit."""
    if not os.path.exists(f"/proc/{pid}"):
        return None, "gone"
    total, source = 0, "pss"
    for p in process_tree(pid):
        kib = _kib(f"/proc/{p}/smaps_rollup", "Pss:")
        if kib is None:
            kib, source = _kib(f"/proc/{p}/status", "VmRSS:"), "rss"
        total += kib or 0
    return total / 1024, source


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

"""The process-tree readings the benchmarks measure a server by (radixserve/bench/procs.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from radixserve.bench.procs import child_pids, cpu_seconds, process_tree, tree_memory_mib


def test_a_process_tree_its_memory_and_cpu_time():
    # A child that starts a grandchild and waits on it: the tree is three deep.
    code = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(30)'])"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(200):  # until the grandchild exists
            grand = child_pids(child.pid)
            if grand:
                break
            time.sleep(0.05)
        assert grand and child.pid in child_pids(os.getpid())
        assert process_tree(os.getpid())[:1] == [os.getpid()]
        assert {child.pid, *grand} <= set(process_tree(os.getpid()))
        alone, _ = tree_memory_mib(grand[0])
        whole, source = tree_memory_mib(child.pid)
        assert source in ("pss", "rss") and whole > alone > 1  # an interpreter holds megabytes
        assert cpu_seconds(os.getpid()) > 0
    finally:
        child.kill()
        child.wait()
    for pid in grand:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    assert tree_memory_mib(child.pid) == (None, "gone")

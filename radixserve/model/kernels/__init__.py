"""C++ CPU kernels compiled on first use (torch.utils.cpp_extension; cached under ~/.cache/torch_extensions).

Where no compiler is available the model falls back to its torch path, after one warning."""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from typing import Callable

logger = logging.getLogger(__name__)


def _cpu_tag() -> str:
    """Builds use -march=native: one per CPU model and feature set, in case the cache is shared."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return hashlib.sha1("".join(lines).encode()).hexdigest()[:10]


@functools.cache
def decode_attention() -> Callable | None:
    """decode_attention.cpp's kernel: (q, k_cache, v_cache, slots, lens, scale) → out, or None."""
    try:
        from torch.utils.cpp_extension import load

        start = time.perf_counter()
        module = load(name=f"radixserve_decode_attention_{_cpu_tag()}",
                      sources=[os.path.join(os.path.dirname(__file__), "decode_attention.cpp")],
                      extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
                      extra_ldflags=["-fopenmp"])
        logger.info("decode attention kernel ready in %.1fs", time.perf_counter() - start)
        return module.decode_attention
    except Exception as e:  # no compiler, no ninja, a failed build: the torch path still works
        logger.warning("decode attention kernel unavailable, using the torch path: %s", str(e).splitlines()[0])
        return None

"""C++ CPU kernels compiled on first use (torch.utils.cpp_extension; cached under ~/.cache/torch_extensions),
and the oneDNN packed-weight matmul helpers (matmul.py).

Where no compiler is available the model falls back to its torch path, after one warning. A leaf package:
it imports nothing else of radixserve, so that model/ and lora/ can both use it."""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from typing import Callable

logger = logging.getLogger(__name__)


_HERE = os.path.dirname(__file__)
_SOURCES = ("module.cpp", "decode_attention.cpp", "lora.cpp", "sampling.cpp", "gguf_matmul.cpp")


def _build_tag() -> str:
    """One build per CPU model and feature set (builds use -march=native, and the cache may be shared)
    and per version of the sources, header included (torch tracks only the compiled files)."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = "".join([line for line in f if line.startswith(("model name", "flags"))][:2])
    except OSError:
        cpu = platform.processor()
    digest = hashlib.sha1(cpu.encode())
    for name in (*_SOURCES, "vec.h", "gguf_rows.h"):
        with open(os.path.join(_HERE, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


@functools.cache
def _module():
    """The compiled module (module.cpp and the kernels), or None where it cannot be built."""
    try:
        from torch.utils.cpp_extension import load

        start = time.perf_counter()
        module = load(name=f"radixserve_cpu_kernels_{_build_tag()}",
                      sources=[os.path.join(_HERE, name) for name in _SOURCES],
                      extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
                      extra_ldflags=["-fopenmp"])
        logger.info("CPU kernels ready in %.1fs", time.perf_counter() - start)
        return module
    except Exception as e:  # no compiler, no ninja, a failed build: the torch paths still work
        logger.warning("CPU kernels unavailable, using the torch paths: %s", str(e).splitlines()[0])
        return None


def decode_attention() -> Callable | None:
    """decode_attention.cpp: (q, k_cache, v_cache, slots, lens, scale) → out, or None."""
    module = _module()
    return None if module is None else module.decode_attention


def lora_add() -> Callable | None:
    """lora.cpp: (y, x, lora_a, lora_b, token_slots, start, rows), adding in place to y, or None."""
    module = _module()
    return None if module is None else module.lora_add


def exponential_race() -> Callable | None:
    """sampling.cpp: (logits float32 [B, V], seeds int64 [B], steps int64 [B]) → drawn token ids, or None."""
    module = _module()
    return None if module is None else module.exponential_race


def gguf_matmul() -> Callable | None:
    """gguf_matmul.cpp: (x [T, K], weight uint8 [N, row bytes], GGML type id, isa) → x @ Wᵀ [T, N] in x's
    dtype, for Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K blocks; isa 0 picks the best the CPU has (gguf_isa)."""
    module = _module()
    return None if module is None else module.gguf_matmul


def build_tag() -> str:
    """This CPU (model and features) and these kernel sources, as one short hash: what a measurement of
    the kernels' speed holds for."""
    return _build_tag()


def gguf_isa() -> int:
    """The instruction set gguf_matmul uses here: 1 portable, 2 AVX2, 3 AVX-512 VNNI (0: no kernels)."""
    module = _module()
    return 0 if module is None else module.gguf_isa()

"""Float weights written as GGUF blocks, in ggml's layout: what kernels/gguf_matmul.cpp multiplies and
gguf's `dequantize` reads back. The K-quants (Q4_K, Q5_K, Q6_K) are written here, gguf's `quantize`
writes the others.

The scales are chosen from each block's range (no search for the error-minimising scale, as llama.cpp's
quantiser does with an importance matrix), so a weight's error is at most half a step of its block."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize as gguf_quantize

SUPER = 256  # weights per super-block: eight blocks of 32 (Q4_K, Q5_K) or sixteen of 16 (Q6_K)
BYTES = {Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}


def quantize(w: np.ndarray, qtype: Q) -> np.ndarray:
    """w float [rows, cols] → uint8 [rows, row bytes] in any block type gguf reads (a K-quant's cols a
    multiple of 256)."""
    if qtype not in BYTES:
        return gguf_quantize(w, qtype)
    rows, cols = w.shape
    if cols % SUPER:
        raise ValueError(f"{qtype.name} needs rows of a multiple of {SUPER} weights, got {cols}")
    x = np.asarray(w, dtype=np.float32).reshape(-1, SUPER)
    blocks = _q6_k(x) if qtype == Q.Q6_K else _q45_k(x, bits=4 if qtype == Q.Q4_K else 5)
    return blocks.reshape(rows, cols // SUPER * BYTES[qtype])


def _half(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """v as stored (float16 bytes [n, 2]) and as the reader sees it (float32)."""
    h = v.astype(np.float16)
    return h.reshape(-1, 1).view(np.uint8), h.astype(np.float32)


def _steps(value: np.ndarray, step: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """round(value / step) within [lo, hi]; 0 where step is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step > 0, np.rint(value / step), 0)
    return np.clip(q, lo, hi).astype(np.int32)


def _q45_k(x: np.ndarray, bits: int) -> np.ndarray:
    """Q4_K / Q5_K: w = d * scale_j * q - dmin * min_j per block j of 32, (scale, min) 6 bits each."""
    top = (1 << bits) - 1
    b = x.reshape(-1, 8, 32)
    low = np.minimum(b.min(-1), 0.0)  # the offset only ever lowers: w = step * q - min, min >= 0
    step, mins = (b.max(-1) - low) / top, -low
    d_bytes, d = _half(step.max(-1) / 63)
    m_bytes, dmin = _half(mins.max(-1) / 63)
    scale = _steps(step, d[:, None], 0, 63)
    mn = _steps(mins, dmin[:, None], 0, 63)
    q = _steps(b + (dmin[:, None] * mn)[..., None], (d[:, None] * scale)[..., None], 0, top)  # [n, 8, 32]

    packed = np.zeros((len(b), 12), np.int32)  # the inverse of the reader's 6-bit unpacking
    packed[:, 0:4] = scale[:, 0:4] | (scale[:, 4:8] >> 4) << 6
    packed[:, 4:8] = mn[:, 0:4] | (mn[:, 4:8] >> 4) << 6
    packed[:, 8:12] = (scale[:, 4:8] & 0x0F) | (mn[:, 4:8] & 0x0F) << 4
    nibbles = (q[:, 0::2] & 0x0F) | (q[:, 1::2] & 0x0F) << 4  # [n, 4, 32]: blocks 2c (low), 2c + 1 (high)
    parts = [d_bytes, m_bytes, packed.astype(np.uint8)]
    if bits == 5:
        parts.append((((q >> 4) & 1) << np.arange(8)[None, :, None]).sum(1).astype(np.uint8))  # bit j: block j
    parts.append(nibbles.reshape(len(b), 128).astype(np.uint8))
    return np.concatenate(parts, axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K: w = d * scale_j * (q - 32) per block j of 16, q 6 bits, scale an int8."""
    b = x.reshape(-1, 16, 16)
    step = np.abs(b).max(-1) / 31
    d_bytes, d = _half(step.max(-1) / 127)
    scale = _steps(step, d[:, None], 0, 127)
    q = _steps(b, (d[:, None] * scale)[..., None], -32, 31).reshape(-1, 2, 4, 32) + 32  # [n, half, k, 32]
    low = q & 0x0F
    ql = np.concatenate([low[:, :, 0] | low[:, :, 2] << 4, low[:, :, 1] | low[:, :, 3] << 4], axis=2)
    qh = ((q >> 4) << (2 * np.arange(4))[None, None, :, None]).sum(2)  # [n, half, 32]: 2 bits per k
    return np.concatenate([ql.reshape(-1, 128).astype(np.uint8), qh.reshape(-1, 64).astype(np.uint8),
                           scale.astype(np.int8).view(np.uint8), d_bytes], axis=1)

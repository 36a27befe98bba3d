"""The GGUF block kernel against the other ways to multiply a layer's weight on this CPU, per step size.

For each projection shape of a model (--model smollm2-135m, the default model: hidden 576, MLP 1536,
vocab 49152, Q4_1 with a Q8_0 head; or llama-1b, Llama 3.2 1B's shapes as a Q4_K_M file stores them:
hidden 2048, MLP 8192, vocab 128256, Q4_K with Q6_K down projections and head) and each step size T,
the median time of:
- blocks: kernels/gguf_matmul.cpp on the file's format (Q4_1 projections, Q8_0 head), best ISA here
  (and each other ISA the CPU has, with --all-isas);
- torch int4: torch's _weight_int4pack_mm_for_cpu on the same 4-bit values (Q4_1 layers only);
- bf16 packed: oneDNN on the weight in bfloat16, reordered once (CPUs with AVX512-BF16);
- f32: F.linear on the weight in float32.
Prints one table; which method is fastest at which T on which CPU is what the weight methods' choice of
step sizes must follow.

    .venv/bin/python benchmarks/gguf_matmul.py [--model llama-1b] [--tokens 1 4 16 64 256] [--all-isas]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from radixserve import kernels  # noqa: E402
from radixserve.kernels.matmul import can_pack, linear, pack_weight  # noqa: E402

from radixserve.model.formats import kquants  # noqa: E402

MODELS = {
    "smollm2-135m": {"qkv": (960, 576, Q.Q4_1), "o": (576, 576, Q.Q4_1), "gate_up": (3072, 576, Q.Q4_1),
                     "down": (576, 1536, Q.Q4_1), "head": (49152, 576, Q.Q8_0)},
    "llama-1b": {"qkv": (3072, 2048, Q.Q4_K), "o": (2048, 2048, Q.Q4_K), "gate_up": (16384, 2048, Q.Q4_K),
                 "down": (2048, 8192, Q.Q6_K), "head": (128256, 2048, Q.Q6_K)},
}
ISA = {1: "portable", 2: "avx2", 3: "avx512"}


def median_ms(fn, min_time: float = 0.3) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=MODELS, default="smollm2-135m")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--all-isas", action="store_true", help="time every instruction set the CPU has")
    ns = ap.parse_args()
    matmul = kernels.gguf_matmul()
    best = kernels.gguf_isa()
    isas = list(range(1, best + 1)) if ns.all_isas else [best]
    bf16 = can_pack(torch.device("cpu"), torch.bfloat16)
    torch.manual_seed(0)
    adt = torch.bfloat16 if bf16 else torch.float32  # the activations' dtype, as the server runs
    print(f"threads {torch.get_num_threads()}; kernel ISA {ISA[best]}; bf16 packing {'yes' if bf16 else 'no'}")
    cols = [f"blocks {ISA[i]}" for i in isas] + ["torch int4"] + (["bf16 packed"] if bf16 else []) + ["f32"]
    print("| layer | T | " + " | ".join(f"{c} ms" for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for name, (n, k, kind) in MODELS[ns.model].items():
        w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32) * 0.05
        data = kquants.quantize(w, kind)
        blocks = torch.from_numpy(np.ascontiguousarray(data))
        dense = torch.from_numpy(dequantize(data, kind).astype(np.float32)).reshape(n, k)
        int4 = None
        if kind == Q.Q4_1:  # the int4 path's own layout: q in 0..15, scale and zero per block of 32
            q = ((dense.view(n, k // 32, 32) - dense.view(n, k // 32, 32).amin(-1, keepdim=True)))
            scale = (dense.view(n, k // 32, 32).amax(-1) - dense.view(n, k // 32, 32).amin(-1)).clamp_min(1e-8) / 15
            q = (q / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
            int4 = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1),
                    torch.stack([scale, dense.view(n, k // 32, 32).amin(-1) + 8 * scale], -1).transpose(0, 1).contiguous().to(adt))
        wb = dense.bfloat16()
        packed = pack_weight(wb) if bf16 else None
        for t in ns.tokens:
            x = torch.randn(t, k)
            xb = x.bfloat16()
            xa = xb if bf16 else x
            row = [median_ms(lambda i=i: matmul(xa, blocks, int(kind), i)) for i in isas]
            row.append(median_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xa, int4[0], 32, int4[1]))
                       if int4 is not None else float("nan"))
            if bf16:
                row.append(median_ms(lambda: linear(xb, wb, None, packed)))
            row.append(median_ms(lambda: F.linear(x, dense)))
            print(f"| {name} {n}x{k} {kind.name} | {t} | " + " | ".join(f"{v:.3f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    with torch.inference_mode():
        main()

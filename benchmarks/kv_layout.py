"""Decode attention's cost by where the sequences' KV slots lie in the pool.

    .venv/bin/python benchmarks/kv_layout.py [--seqs 64] [--keys 448] [--pool 32768] [--reps 9]

The C++ decode-attention kernel on the default model's shapes (30 layers, 3 KV heads of 64, 9 query
heads, the server's `--dtype auto`), one decode step of --seqs sequences of
--keys keys each, over a pool of --pool slots, with each sequence's slots laid out as

    contiguous   every sequence in consecutive slots (a fresh pool, a prompt in one chunk)
    runs of 64   runs of 64 consecutive slots at random places (the allocator's reservations)
    runs of 16   the same with runs of 16
    interleaved  slot t of sequence g at t * seqs + g: a token-granular allocator handing each decode
                 step's slots out in one block, one per sequence
    random       every slot anywhere (a long-running free list)

Median ms per step over --reps rounds; the layouts alternate within a round so that the machine's
drift hits them alike.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from radixserve import kernels
from radixserve.model.runner import resolve_dtype

LAYERS, KV_HEADS, HEADS, HEAD_DIM = 30, 3, 9, 64


def layouts(seqs: int, keys: int, pool: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    def runs(length: int) -> torch.Tensor:
        starts = torch.randperm((pool - 1) // length, generator=g)[: seqs * keys // length] * length
        return (starts[:, None] + torch.arange(length)).reshape(seqs, keys) + 1

    return {
        "contiguous": torch.arange(1, 1 + seqs * keys).view(seqs, keys),
        "runs of 64": runs(64),
        "runs of 16": runs(16),
        "interleaved": torch.arange(1, 1 + seqs * keys).view(keys, seqs).t().contiguous(),
        "random": runs(1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--keys", type=int, default=448, help="a multiple of 64")
    ap.add_argument("--pool", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    attend = kernels.decode_attention()
    if attend is None:
        raise SystemExit("the decode attention kernel is not built (no C++ toolchain)")
    dtype = resolve_dtype("auto", torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    shape = (LAYERS, KV_HEADS, args.pool, HEAD_DIM)
    k, v = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    q = torch.randn(args.seqs, HEADS, HEAD_DIM, generator=g).to(dtype)
    lens = torch.full((args.seqs,), args.keys, dtype=torch.int64)
    cases = layouts(args.seqs, args.keys, args.pool, g)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.reps):
        for name, slots in cases.items():
            start = time.perf_counter()
            for layer in range(LAYERS):
                attend(q, k[layer], v[layer], slots, lens, HEAD_DIM ** -0.5)
            times[name].append((time.perf_counter() - start) * 1e3)
    print(f"{args.seqs} sequences x {args.keys} keys, pool {args.pool}, {dtype}, {torch.get_num_threads()} threads")
    base = statistics.median(times["contiguous"])
    for name, t in times.items():
        m = statistics.median(t)
        print(f"  {name:12s} {m:7.1f} ms per step ({m / base:.2f}x)")


if __name__ == "__main__":
    main()

"""Encoder forward time by attention layout, on the default embedding model (all-MiniLM-L6-v2).

    .venv/bin/python benchmarks/encoder_attention.py [--dtype float32] [--threads 2]

A step's texts are packed into one token stream (linears and norms see real tokens only). Attention can
then run (a) padded: the texts gathered into [B, Lmax] with a key-padding mask, one SDPA call (what
`model/bert.py` does), or (b) block-diagonal: one SDPA call over the whole stream [1, T] with a mask
that keeps each token within its text. Texts: 40-80 tokens, random ids; median of --repeats steps.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

from radixserve.config import ServerArgs
from radixserve.model import bert
from radixserve.model.encoder_runner import EncoderRunner


def block_diagonal(q, k, v, inp):
    mask = inp.seq_ids[:, None] == inp.seq_ids[None, :]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=mask)
    return o[0].transpose(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    runner = EncoderRunner(ServerArgs(is_embedding=True, dtype=args.dtype, device="cpu", num_threads=args.threads))
    rng = random.Random(0)
    padded = bert._padded_attention
    print(f"| texts | padded ms | block-diagonal ms | ratio |  ({args.dtype}, {torch.get_num_threads()} threads)")
    print("|---|---|---|---|")
    for b in args.batches:
        texts = [[rng.randrange(1000, 30000) for _ in range(rng.randint(40, 80))] for _ in range(b)]
        inp = bert.EncoderInput.pack(texts, runner.device)
        times = {}
        for name, fn in (("padded", padded), ("block", block_diagonal)):
            bert._padded_attention = fn
            with torch.inference_mode():
                runner.model(inp)
                samples = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    runner.model(inp)
                    samples.append(time.perf_counter() - t0)
            times[name] = statistics.median(samples) * 1000
        bert._padded_attention = padded
        print(f"| {b} | {times['padded']:.1f} | {times['block']:.1f} | {times['block'] / times['padded']:.1f}x |")


if __name__ == "__main__":
    main()

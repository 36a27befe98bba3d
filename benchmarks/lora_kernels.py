"""Which batched-LoRA kernel is fastest where: the per-linear alternatives at the model's shapes, and the
two paths radixserve has (lora/ops.py) over whole forward passes.

    .venv/bin/python benchmarks/lora_kernels.py [--model-path PATH] [--dtype auto] [--rank 16]

Linear level (the qkv, o, gate_up and down shapes summed, added time over the base matmuls): decode of
16 tokens over 4 adapters + base, and a 256-token prefill of one adapter, for
  grouped      two grouped_mm over the per-slot weights (radixserve, prefill-sized steps)
  stacked      one GEMM over every slot's A, mask, one GEMM over every slot's B, both through
               oneDNN-packed copies (radixserve, decode-sized steps)
  gather-bmm   per-token gathered A and B, batched matrix-vector products (BGMV)
  padded-bmm   tokens padded per adapter to the longest segment, two bmm
  loop         one matmul pair per adapter segment
Step level: decode of 16 requests over 4 adapters + base, and of 48 over 4 adapters; prefill of 128
tokens for each of two adapters; each with the C++ kernel (radixserve/kernels/lora.cpp, where it builds) and
with either torch path forced, relative to the same step on the base model.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from radixserve.kernels.matmul import can_pack, linear, pack_weight


def best_us(fns: list, reps: int) -> dict[str, float]:
    """Best time per call of each function (µs), measured in interleaved rounds so that machine noise
    hits every variant alike."""
    for fn in fns:
        fn()
    best = {fn.__name__: float("inf") for fn in fns}
    for _ in range(7):
        for fn in fns:
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            best[fn.__name__] = min(best[fn.__name__], (time.perf_counter() - start) / reps * 1e6)
    return best


def linear_level(cfg, dtype: torch.dtype, rank: int, slots: int = 8) -> None:
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    h, inter = cfg.hidden_size, cfg.intermediate_size
    mods = {"qkv": (h, q + 2 * kv, 3), "o": (q, h, 1), "gate_up": (h, 2 * inter, 2), "down": (inter, h, 1)}
    cases = {"decode 16 (4 adapters + base)": [4, 3, 3, 3, 3] + [0] * (slots - 4),
             "prefill 256 (one adapter)": [0, 256] + [0] * (slots - 1)}
    g = torch.Generator().manual_seed(0)
    for label, counts in cases.items():
        total = {}
        nb, t = counts[0], sum(counts)
        offs = torch.tensor(counts[1:], dtype=torch.int64).cumsum(0).to(torch.int32)
        tok_slot = torch.repeat_interleave(torch.arange(slots), torch.tensor(counts[1:]))
        tmax = max(counts[1:])
        pad_idx = torch.zeros(slots, tmax, dtype=torch.long)
        valid = torch.zeros(slots, tmax, dtype=torch.bool)
        end = nb
        segs = []
        for s, n in enumerate(counts[1:]):
            pad_idx[s, :n] = torch.arange(end, end + n)
            valid[s, :n] = True
            if n:
                segs.append((s, end, end + n))
            end += n
        pad_idx, sel = pad_idx.flatten(), valid.flatten().nonzero().flatten()
        for in_f, out_f, pieces in mods.values():
            rows = rank * pieces
            w = (torch.randn(out_f, in_f, generator=g) * 0.02).to(dtype)
            a = (torch.randn(slots, rows, in_f, generator=g) * 0.02).to(dtype)
            b = (torch.randn(slots, rows, out_f, generator=g) * 0.02).to(dtype)
            x = torch.randn(t, in_f, generator=g).to(dtype)
            mask = (tok_slot[:, None] == torch.arange(slots)[None]).repeat_interleave(rows, 1).to(dtype)
            packs = can_pack(x.device, dtype)
            w_p, a_p, b_p = ((pack_weight(w), pack_weight(a.flatten(0, 1)), pack_weight(b.flatten(0, 1).T))
                             if packs else (None, None, None))

            def base():
                return linear(x, w, None, w_p)

            def grouped():
                y = linear(x, w, None, w_p)
                y[nb:] += F.grouped_mm(F.grouped_mm(x[nb:], a.transpose(1, 2), offs=offs), b, offs=offs)

            def stacked():
                y = linear(x, w, None, w_p)
                h = linear(x[nb:], a.flatten(0, 1), None, a_p) * mask
                y[nb:] += linear(h, b.flatten(0, 1).T, None, b_p)

            def gather_bmm():
                y = linear(x, w, None, w_p)
                hh = torch.bmm(x[nb:, None], a[tok_slot].transpose(1, 2))
                y[nb:] += torch.bmm(hh, b[tok_slot])[:, 0]

            def padded_bmm():
                y = linear(x, w, None, w_p)
                xp = x.index_select(0, pad_idx).view(slots, tmax, in_f)
                d = torch.bmm(torch.bmm(xp, a.transpose(1, 2)), b).view(-1, out_f)
                y[nb:] += d.index_select(0, sel)

            def loop():
                y = linear(x, w, None, w_p)
                for s, lo, hi in segs:
                    y[lo:hi] += (x[lo:hi] @ a[s].T) @ b[s]

            reps = 5 if t > 100 else 50
            for name, us in best_us([base, grouped, stacked, gather_bmm, padded_bmm, loop], reps).items():
                total[name] = total.get(name, 0.0) + us
        line = " ".join(f"{k} +{v - total['base']:.0f}" for k, v in total.items() if k != "base")
        print(f"linears, {label}: base {total['base']:.0f} us | added: {line}")


def main() -> None:
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from lora import write_adapter

    from radixserve.config import ServerArgs, default_model_path
    from radixserve.engine.batch import build_batch
    from radixserve.engine.request import Request
    from radixserve.lora import ops
    from radixserve.lora.manager import LoRAManager
    from radixserve.lora.refs import parse_lora_paths
    from radixserve.model.runner import ModelRunner
    from radixserve.sampling.params import SamplingParams

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    path = args.model_path or default_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        from radixserve.model.loader import load_model_config

        cfg = load_model_config(path)
        folders = [write_adapter(os.path.join(tmp, f"a{i}"), cfg, args.rank, seed=i) for i in range(4)]
        sargs = ServerArgs(model_path=path, dtype=args.dtype, device="cpu", max_total_tokens=32768,
                           max_running_requests=256, lora_paths=[f"a{i}={p}" for i, p in enumerate(folders)])
        runner = ModelRunner(sargs)
        print(f"{os.path.basename(path)}, {runner.dtype}, {torch.get_num_threads()} threads, rank {args.rank}, "
              f"all projections")
        linear_level(cfg, runner.dtype, args.rank)
        lora = LoRAManager(runner.config.num_layers, runner.lora_buffers, runner.lora_layout, runner.dtype,
                           sargs.max_loras_per_batch, sargs.max_loaded_loras, parse_lora_paths(sargs.lora_paths))
        for lid in range(1, 5):
            lora.acquire(lid)
        next_slot = [1]

        def requests(loras: list[int], new: int, ctx: int) -> list[tuple[Request, int]]:
            entries = []
            for i, lid in enumerate(loras):
                r = Request(rid=str(i), prompt_ids=list(range(100, 100 + ctx)), params=SamplingParams(), seed=0,
                            lora_id=lid)
                r.row, r.num_computed = runner.kv.alloc_row(), ctx - new
                runner.kv.req_to_token[r.row, :ctx] = torch.arange(next_slot[0], next_slot[0] + ctx)
                next_slot[0] += ctx
                entries.append((r, new))
            return entries

        def forward(entries) -> float:
            slots = torch.arange(1, 1 + sum(n for _, n in entries))
            ids = {r.lora_id for r, _ in entries if r.lora_id}
            kv = runner.kv.req_to_token
            if ids:
                batch = build_batch(entries, slots, kv, runner.device, lora.prepare(ids),
                                    max(lora.rank(i) for i in ids), lora.buffers.num_slots, lora.linears(ids))
            else:
                batch = build_batch(entries, slots, kv, runner.device)
            start = time.perf_counter()
            runner.forward(batch.model_input)
            return time.perf_counter() - start

        cases = {"decode 16 over 4 adapters + base": ([i % 5 for i in range(16)], 1, 200),
                 "decode 48 over 4 adapters": ([1 + i % 4 for i in range(48)], 1, 200),
                 "prefill 2 x 128 of two adapters": ([1, 2], 128, 128)}
        for label, (loras, new, ctx) in cases.items():
            with_lora = requests(loras, new, ctx)
            plain = requests([0] * len(loras), new, ctx)
            kernel = runner.lora_kernel
            times: dict[str, list[float]] = {}
            for _ in range(7):  # interleaved: machine noise hits every variant alike
                times.setdefault("base", []).append(forward(plain))
                for name, slack, use_kernel in (("kernel", 0, True), ("grouped", -10**9, False),
                                                ("stacked", 10**9, False)):
                    if use_kernel and kernel is None:
                        continue
                    ops.STACKED_SLACK, runner.lora_kernel = slack, kernel if use_kernel else None
                    times.setdefault(name, []).append(forward(with_lora))
            runner.lora_kernel = kernel
            best = {k: min(v) for k, v in times.items()}
            print(f"step, {label}: base {best['base'] * 1e3:.1f} ms, "
                  + ", ".join(f"{k} {v * 1e3:.1f} ms ({best['base'] / v:.2f}x)" for k, v in best.items() if k != "base")
                  + "; medians " + ", ".join(f"{k} {statistics.median(v) * 1e3:.1f}" for k, v in times.items()))


if __name__ == "__main__":
    main()

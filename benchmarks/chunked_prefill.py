"""How --chunked-prefill-size trades prefill throughput against decode stalls (in-process scheduler).

    .venv/bin/python benchmarks/chunked_prefill.py [--sizes 64 128 256 512 1024] [--dtype auto]

For each chunk size: 8 requests are decoding when a 2,048-token prompt arrives. Reported: prefill
tokens/s of that prompt (its chunks share steps with the decodes), and the decoders' worst and mean
step time while it is being prefilled (their inter-token latency).
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from radixserve.config import ServerArgs
from radixserve.engine.scheduler import Scheduler
from radixserve.managers.messages import GenerateReq
from radixserve.model.runner import ModelRunner
from radixserve.sampling.params import SamplingParams


def run(runner: ModelRunner, chunk: int, dtype: str, rng: random.Random) -> tuple[float, float, float]:
    args = ServerArgs(dtype=dtype, max_total_tokens=runner.kv.slots.num_slots - 1, max_running_requests=16,
                      chunked_prefill_size=chunk, disable_radix_cache=True)
    s = Scheduler(args, runner=runner)
    decode = SamplingParams(max_new_tokens=10_000, temperature=0, ignore_eos=True)
    for i in range(8):
        s.submit(GenerateReq(f"d{i}", [rng.randrange(1000, 40000) for _ in range(100)], decode))
    while any(r.remaining > 1 for r in s.running) or s.waiting:
        s.step()
    for _ in range(3):
        s.step()
    long_prompt = [rng.randrange(1000, 40000) for _ in range(2048)]
    s.submit(GenerateReq("long", long_prompt, SamplingParams(max_new_tokens=1)))
    steps = []
    start = time.perf_counter()
    while "long" in s.by_rid:
        t = time.perf_counter()
        s.step()
        steps.append(time.perf_counter() - t)
    prefill = len(long_prompt) / (time.perf_counter() - start)
    for rid in list(s.by_rid):
        s.abort(rid)
    s.take_outputs()
    return prefill, max(steps), statistics.mean(steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    runner = ModelRunner(ServerArgs(dtype=args.dtype, max_total_tokens=8192, max_running_requests=16))
    rng = random.Random(0)
    run(runner, 256, args.dtype, rng)  # warm-up
    print(f"{'chunk':>6}{'prefill tok/s':>15}{'worst ITL ms':>14}{'mean ITL ms':>13}")
    for size in args.sizes:
        prefill, worst, mean = run(runner, size, args.dtype, rng)
        print(f"{size:>6}{prefill:>15.0f}{worst * 1000:>14.0f}{mean * 1000:>13.0f}")


if __name__ == "__main__":
    main()

"""Embeddings per second through HTTP vs sentence-transformers offline, on the same texts in one run.

    .venv/bin/python benchmarks/embeddings.py [--num-texts 512] [--dtype auto] [--json-out results.json]

Starts `radixserve serve --is-embedding` (the default embedding model, all-MiniLM-L6-v2) on a free port
and measures, one after the other so that nothing overlaps:
  - HTTP, concurrency 1 and 32: clients posting one ~60-token text per /v1/embeddings request
    (float output), embeddings/s over all texts;
  - latency of one short text at concurrency 1 (p50 / p90 over --latency-requests requests);
  - sentence-transformers' offline `encode(texts, batch_size=32)` on the same texts (its own default,
    float32), with the server idle.
The clients speak plain HTTP/1.1 over keep-alive asyncio streams (a few dozen lines below) rather than
httpx or the openai client, which cost ~3 ms of CPU per request: on a small machine the clients share
the CPU with the server, which the offline baseline does not have to, so they are kept as light as
possible. The server and client CPU seconds per request are reported too.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time

import httpx

from radixserve.bench.procs import child_pids, cpu_seconds

_WORDS = ("serving engines batch many requests into one forward pass so that the hardware stays busy while "
          "each client still sees a short latency an embedding model turns a sentence into a vector whose "
          "direction captures its meaning similar sentences point the same way search engines compare "
          "these vectors to find relevant documents quickly across millions of candidates").split()


def make_texts(n: int, tokens: int, seed: int = 0) -> list[str]:
    """n distinct texts of about `tokens` tokens each (plain English words, ~1 token per word)."""
    rng = random.Random(seed)
    return [f"{i}: " + " ".join(rng.choice(_WORDS) for _ in range(tokens - 4)) for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "radixserve.cli", "serve", "--is-embedding", "--port", str(port),
           "--dtype", args.dtype, "--log-level", "warning", *args.server_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become healthy")


class Connection:
    """One keep-alive HTTP/1.1 connection posting JSON (the server answers with Content-Length)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, payload: dict) -> dict:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(payload).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        data = await self.reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {data[:300]!r}")
        return json.loads(data)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def http_run(url: str, model: str, texts: list[str], concurrency: int) -> tuple[float, list[float]]:
    """Seconds to embed all texts with `concurrency` clients (one text per request), and each latency."""
    queue = list(reversed(texts))
    latencies: list[float] = []
    host, port = url.removeprefix("http://").split(":")

    async def worker():
        conn = Connection(host, int(port))
        try:
            while queue:
                text = queue.pop()
                t0 = time.perf_counter()
                out = await conn.post("/v1/embeddings", {"model": model, "input": text})
                latencies.append(time.perf_counter() - t0)
                assert len(out["data"]) == 1
        finally:
            conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-texts", type=int, default=512, help="texts per measurement")
    parser.add_argument("--text-tokens", type=int, default=60, help="approximate tokens per text")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--latency-requests", type=int, default=200, help="requests of the short-text latency run")
    parser.add_argument("--dtype", default="auto", help="the server's --dtype")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="more `serve` flags (last)")
    parser.add_argument("--json-out", help="also write the figures as JSON")
    args = parser.parse_args()

    texts = make_texts(args.num_texts, args.text_tokens)
    results: dict = {"num_texts": len(texts), "text_tokens": args.text_tokens, "dtype": args.dtype,
                     "loadavg_before": open("/proc/loadavg").read().split()[:3]}
    proc, url = start_server(args)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        info = httpx.get(url + "/get_model_info").json()
        results["server_dtype"] = info["dtype"]
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(info["model_path"])
        results["mean_tokens"] = sum(len(x) for x in tok(texts)["input_ids"]) / len(texts)
        print(f"{len(texts)} texts of {results['mean_tokens']:.1f} tokens on average; server dtype {info['dtype']}, "
              f"{os.cpu_count()} CPUs", flush=True)
        asyncio.run(http_run(url, model, make_texts(64, args.text_tokens, seed=1), 32))  # warm-up
        engine_pids = child_pids(proc.pid)
        for c in args.concurrency:
            api0, eng0, client0 = cpu_seconds(proc.pid), sum(map(cpu_seconds, engine_pids)), time.process_time()
            seconds, _ = asyncio.run(http_run(url, model, texts, c))
            api1, eng1, client1 = cpu_seconds(proc.pid), sum(map(cpu_seconds, engine_pids)), time.process_time()
            n = len(texts)
            results[f"http_c{c}_per_s"] = n / seconds
            results[f"http_c{c}_cpu_ms_per_request"] = {"api": (api1 - api0) / n * 1000,
                                                        "engine": (eng1 - eng0) / n * 1000,
                                                        "client": (client1 - client0) / n * 1000}
            cpu = results[f"http_c{c}_cpu_ms_per_request"]
            print(f"HTTP concurrency {c}: {n / seconds:.1f} embeddings/s (CPU ms per request: API process "
                  f"{cpu['api']:.2f}, engine process {cpu['engine']:.2f}, clients {cpu['client']:.2f})", flush=True)
        _, lat = asyncio.run(http_run(url, model, ["A short sentence to embed."] * args.latency_requests, 1))
        results["short_p50_ms"] = statistics.median(lat) * 1000
        results["short_tokens"] = len(tok("A short sentence to embed.")["input_ids"])
        results["short_p90_ms"] = percentile(lat, 90) * 1000
        print(f"one short text, concurrency 1: p50 {results['short_p50_ms']:.1f} ms, "
              f"p90 {results['short_p90_ms']:.1f} ms", flush=True)
        model_path = info["model_path"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_path, device="cpu")
    st.encode(texts[:64], batch_size=32)  # warm-up
    start = time.perf_counter()
    st.encode(texts, batch_size=32, normalize_embeddings=True)
    results["st_offline_per_s"] = len(texts) / (time.perf_counter() - start)
    print(f"sentence-transformers offline encode(batch_size=32): {results['st_offline_per_s']:.1f} embeddings/s")
    for c in args.concurrency:
        ratio = results[f"http_c{c}_per_s"] / results["st_offline_per_s"]
        results[f"http_c{c}_vs_st"] = ratio
        print(f"HTTP c={c} / sentence-transformers offline: {ratio:.2f}x")
    results["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    print(f"load average before / after: {results['loadavg_before']} / {results['loadavg_after']}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

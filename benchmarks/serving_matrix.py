"""radixserve vs vLLM's CPU engine vs llama.cpp's llama-server, side by side on the same workloads.

    .venv/bin/python benchmarks/serving_matrix.py --peer-tools DIR [--servers radixserve vllm llamacpp]

Each server is started alone (the machine otherwise idle), measured at three levels with the same
prompts, then stopped:

    c1      16 distinct ~200-token prompts, one at a time
    c32     64 distinct ~200-token prompts, 32 at a time
    shared  64 prompts of one ~800-token prefix + a short distinct question, 32 at a time

always `/v1/completions`, streaming, 128 output tokens with EOS ignored. DIR holds the peers' scripts
(`vllm_cpu.sh`, `start_llamacpp.sh`, `stop_llamacpp.sh`; installed beforehand with `vllm_cpu.sh
install && vllm_cpu.sh convert` and `build_llamacpp.sh`). Writes `<out>.json` and a plot `<out>.png`
(throughput and ITL p99 per level and server).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import httpx

from radixserve.bench.run import add_bench_args, bench

LEVELS = {  # name → (dataset, prompts, concurrency)
    "c1": ("random", 16, 1),
    "c32": ("random", 64, 32),
    "shared": ("shared-prefix", 64, 32),
}
# What the machine allows (2 cores, ~31 GB/s, ~400 GFLOP/s bf16 GEMM), for the fraction beside each
# figure: a batch-1 decode step streams the Q4 weights; a 32-wide one is bound by the linears' FLOPs.
BOUND_TOK_S = {"c1": 320, "c32": 700, "shared": 700}


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 600) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not become healthy in {timeout:.0f} s")


class Server:
    """Start/stop one server on a port."""

    def __init__(self, name: str, port: int, tools: str | None, extra: list[str]):
        self.name, self.port, self.tools, self.extra = name, port, tools, extra
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.name == "radixserve":
            self.log = open(f"/tmp/radixserve-matrix-{self.port}.log", "w")
            cli = os.path.join(os.path.dirname(sys.executable), "radixserve")
            self.proc = subprocess.Popen([cli, "serve", "--port", str(self.port), *self.extra], stdout=self.log,
                                         stderr=subprocess.STDOUT)
        elif self.name == "vllm":
            env = {**os.environ, "ZEN": os.environ.get("ZEN", "1")}
            subprocess.run(["bash", f"{self.tools}/vllm_cpu.sh", "start", str(self.port), *self.extra], check=True,
                           env=env)
        elif self.name == "llamacpp":
            subprocess.run(["bash", f"{self.tools}/start_llamacpp.sh", str(self.port), *self.extra], check=True)
        else:
            raise ValueError(f"unknown server {self.name!r}")
        wait_healthy(self.url, self.proc)

    def stop(self) -> None:
        if self.name == "radixserve":
            self.proc.terminate()
            self.proc.wait(60)
            self.log.close()
        elif self.name == "vllm":
            subprocess.run(["bash", f"{self.tools}/vllm_cpu.sh", "stop", str(self.port)], check=False)
        else:
            subprocess.run(["bash", f"{self.tools}/stop_llamacpp.sh", str(self.port)], check=False)


def measure(url: str, ns: argparse.Namespace) -> dict:
    bench_parser = argparse.ArgumentParser()
    add_bench_args(bench_parser)
    out = {}
    for level in ns.levels:
        dataset, num, concurrency = LEVELS[level]
        args = bench_parser.parse_args(["--base-url", url, "--dataset", dataset, "--num-prompts", str(num),
                                        "--concurrency", str(concurrency), "--output-len", str(ns.output_len),
                                        "--input-len", str(ns.input_len), "--seed", str(ns.seed)])
        out[level] = bench(args)[url][concurrency]
    return out


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = list(results)
    levels = list(next(iter(results.values())))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(servers)
    for ax, key, title in ((axes[0], "output_throughput", "output tok/s (higher is better)"),
                           (axes[1], "itl_p99_ms", "ITL p99, ms (lower is better)")):
        for i, name in enumerate(servers):
            values = [results[name][lv][key] for lv in levels]
            bars = ax.bar([x + i * width for x in range(len(levels))], values, width, label=name)
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks([x + width * (len(servers) - 1) / 2 for x in range(len(levels))], levels)
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", nargs="+", default=["radixserve", "vllm", "llamacpp"])
    ap.add_argument("--peer-tools", default=None, help="folder of vllm_cpu.sh / start_llamacpp.sh / stop_llamacpp.sh")
    ap.add_argument("--levels", nargs="+", choices=list(LEVELS), default=list(LEVELS))
    ap.add_argument("--port", type=int, default=30100)
    ap.add_argument("--radixserve-args", nargs=argparse.REMAINDER, default=[],
                    help="flags for `radixserve serve` (last on the command line)")
    ap.add_argument("--input-len", type=int, default=198)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/serving_matrix")
    ns = ap.parse_args()
    if any(s != "radixserve" for s in ns.servers) and not ns.peer_tools:
        ap.error("--peer-tools is needed to start vllm / llamacpp")

    results = {}
    for name in ns.servers:
        server = Server(name, ns.port, ns.peer_tools, ns.radixserve_args if name == "radixserve" else [])
        print(f"== {name}: starting", flush=True)
        server.start()
        try:
            results[name] = measure(server.url, ns)
        finally:
            server.stop()
        time.sleep(5)  # let the machine settle before the next server

    print(f"\n{'server':<12}{'level':<8}{'out tok/s':>10}{'of bound':>10}{'TTFT p50':>10}{'ITL p50':>9}"
          f"{'ITL p99':>9}{'cache hit':>10}")
    for name, levels in results.items():
        for level, r in levels.items():
            print(f"{name:<12}{level:<8}{r['output_throughput']:>10.1f}"
                  f"{r['output_throughput'] / BOUND_TOK_S[level]:>10.0%}{r['ttft_p50_ms']:>10.0f}"
                  f"{r['itl_p50_ms']:>9.1f}{r['itl_p99_ms']:>9.1f}{r['cache_hit_rate']:>10.0%}")
    with open(f"{ns.out}.json", "w") as f:
        args = {k: v for k, v in vars(ns).items() if k != "peer_tools"}
        json.dump({"args": args, "bound_tok_s": BOUND_TOK_S, "results": results}, f, indent=2)
    try:
        plot(results, f"{ns.out}.png")
    except ImportError:  # matplotlib is not one of the project's dependencies
        print(f"wrote {ns.out}.json (no plot: `pip install matplotlib` for {ns.out}.png)")
        return
    print(f"wrote {ns.out}.json and {ns.out}.png")


if __name__ == "__main__":
    main()

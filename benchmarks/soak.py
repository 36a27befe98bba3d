"""Soak test: a long run of mixed, partly hostile traffic against one server, watching for errors, leaks
and slowdowns.

    .venv/bin/python benchmarks/soak.py [--duration 1800] [--concurrency 64] [--radixserve-args ...]
    .venv/bin/python benchmarks/soak.py --base-url http://127.0.0.1:30000 [--pid PID] [--api-key KEY]

Without --base-url the script starts `radixserve serve --port P` itself (the flags after
--radixserve-args go to it; its log is /tmp/radixserve-matrix-P.log) and always stops it at the end.

Load: a closed loop of --concurrency workers for --duration seconds, each drawing every request from its
own seeded RNG: chat or completions (50/50), streamed or not (50/50), 10 % with an output constraint (a
small JSON schema for chat, the regex [a-z]{3,8} for completions), 10 % with n=2, 8..64 new tokens, a
short random prompt; 20 % of the streams are cut by the client after a few events, and 5 % of all
requests are hostile bodies (a rotating list: invalid JSON, unknown field, wrong types, out-of-range
values, empty messages, a missing model, ...). Every outcome is one of

    ok            2xx with a well-formed body (a stream ending in `data: [DONE]`)
    expected_4xx  a hostile body answered 4xx with an error body ({"error": {"message": ...}}, or the flat
                  {"object": "error", "message": ...} of SGLang/vLLM)
    503           overloaded or engine down: counted apart, not an error
    cut           a stream the client closed on purpose
    error         anything else: other 5xx, a 4xx for a well-formed request, a malformed body, a request
                  over --request-timeout, a connection error, a stream without `data: [DONE]`

Every --interval seconds one line: requests by outcome, latency p50/p99 of the ok requests, the server's
process-tree memory (PSS of the pid and its descendants, RSS where smaps_rollup is unreadable; when the
pid is known: --pid, or the server started here) and the KV pool of /get_server_info.

At the end the load stops (requests in flight are abandoned: disconnects the server must clean up), the
server must become idle, /flush_cache is called, and the checks decide the exit code (0: all pass):

    errors == 0         no request classed `error`
    KV all free         kv_free == kv_total after the flush
    memory drift < 5 %  mean memory of the last 1/6 of the samples vs the samples from 1/6 to 1/3 of the
                        run (for 30 one-minute samples: minutes 25-30 vs 5-10; the first 1/6 is warm-up:
                        caches and allocator arenas filling up); growth only, a drop is no leak
    p99 drift <= 10 %   p99 latency of the ok requests over the same two windows; growth only

The KV pool is allocated untouched, so memory also rises until each slot in use has been written once
(~23 KB a token, default model): size the pool to fill within the warm-up (--radixserve-args
--max-total-tokens 16384), or the memory check sees that rather than a leak. The run must cover at least
6 intervals. Args, samples, summary, checks and up to 20 sample errors go to --out as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

sys.path.insert(0, os.path.dirname(__file__))
from serving_matrix import Server  # noqa: E402

from radixserve.bench.client import consume_sse, make_prompts  # noqa: E402
from radixserve.bench.procs import tree_memory_mib  # noqa: E402
from radixserve.bench.stats import percentiles  # noqa: E402

CLASSES = ("ok", "expected_4xx", "503", "cut", "error")
MAX_SAMPLE_ERRORS = 20
PROMPT_POOL, PROMPT_TOKENS = 512, 40  # a few dozen words each; repeats give the prefix cache some hits
JSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 150}},
               "required": ["name", "age"], "additionalProperties": False}
REGEX = "[a-z]{3,8}"
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def hostile_bodies(model: str) -> list[tuple[str, str, dict | bytes]]:
    """(label, endpoint, body): each must be answered 4xx with an error body, never 5xx or 2xx."""
    msgs = [{"role": "user", "content": "Say hello."}]
    return [
        ("invalid JSON", "chat", b'{"model": "m", "messages": [{"role": "user", "content": "hi"'),
        ("unknown field", "chat", {"model": model, "messages": msgs, "max_tokens": 8, "frobnicate": True}),
        ("max_tokens string", "completions", {"model": model, "prompt": "Hello", "max_tokens": "x"}),
        ("temperature -1", "chat", {"model": model, "messages": msgs, "max_tokens": 8, "temperature": -1}),
        ("empty messages", "chat", {"model": model, "messages": [], "max_tokens": 8}),
        ("n 1000", "completions", {"model": model, "prompt": "Hello", "max_tokens": 8, "n": 1000}),
        ("seed 2**70", "chat", {"model": model, "messages": msgs, "max_tokens": 8, "seed": 2**70}),
        ("prompt [-1]", "completions", {"model": model, "prompt": [-1], "max_tokens": 8}),
        ("missing model", "chat", {"messages": msgs, "max_tokens": 8}),
        ("nested garbage", "chat", {"model": model, "messages": [{"role": "user", "content": [[{"x": [None, {}]}]]}],
                                    "max_tokens": {"a": [1, [2, [3]]]}}),
    ]


def error_shape(content: bytes) -> str | None:
    """'openai' for {"error": {"message": str}}, 'flat' for {"object": "error", "message": str}, else None."""
    try:
        body = json.loads(content)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    if isinstance(body.get("error"), dict) and isinstance(body["error"].get("message"), str):
        return "openai"
    if body.get("object") == "error" and isinstance(body.get("message"), str):
        return "flat"
    return None


@dataclass
class Plan:
    kind: str  # for error descriptions, e.g. "chat stream n=2" or "hostile: seed 2**70"
    endpoint: str
    body: dict | bytes
    stream: bool = False
    n: int = 1
    cut_after: int = 0  # data events to read before closing the connection (0: read to the end)
    hostile: bool = False


class _Tap:
    """The lines of an SSE stream on their way to consume_sse: notes `[DONE]` and the last event, and
    ends the stream early for a cut."""

    def __init__(self, lines, cut_after: int):
        self.src, self.cut_after = lines, cut_after
        self.events, self.done, self.cut, self.last = 0, False, False, ""

    async def lines(self):
        async for line in self.src:
            if line.startswith("data:"):
                data = line[5:].strip()
                if data == "[DONE]":
                    self.done = True
                else:
                    if self.cut_after and self.events >= self.cut_after:
                        self.cut = True
                        return
                    self.events += 1
                    self.last = data
            yield line


@dataclass
class Soak:
    url: str
    model: str
    prompts: list[str]
    ns: argparse.Namespace
    headers: dict
    window: list[tuple[str, float]] = field(default_factory=list)  # (class, seconds) since the last sample
    totals: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    error_shapes: Counter = field(default_factory=Counter)
    stopping: bool = False
    in_flight: int = 0

    def __post_init__(self):
        self.hostile = itertools.cycle(hostile_bodies(self.model))

    def plan(self, rng: random.Random) -> Plan:
        if rng.random() < 0.05:
            label, endpoint, body = next(self.hostile)  # rotating, so every kind recurs all run long
            return Plan(f"hostile: {label}", endpoint, body, hostile=True)
        chat, stream = rng.random() < 0.5, rng.random() < 0.5
        structured, n = rng.random() < 0.1, 2 if rng.random() < 0.1 else 1
        cut_after = rng.randint(1, 3) if stream and rng.random() < 0.2 else 0
        prompt = rng.choice(self.prompts)
        body = {"model": self.model, "max_tokens": rng.randint(8, 64), "temperature": rng.choice((0.0, 0.7, 1.0))}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if structured and chat:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": JSON_SCHEMA}}
        elif structured:
            body["regex"] = REGEX
        if n > 1:
            body["n"] = n
        if stream:
            body["stream"] = True
            if rng.random() < 0.5:  # both ends of the stream: with and without the usage chunk
                body["stream_options"] = {"include_usage": True}
        kind = " ".join(w for w, on in (("chat" if chat else "completions", True), ("stream", stream),
                                        ("structured", structured), ("n=2", n > 1), ("cut", cut_after)) if on)
        return Plan(kind, "chat" if chat else "completions", body, stream, n, cut_after)

    async def send(self, client: httpx.AsyncClient, p: Plan) -> tuple[str, str]:
        """(class, error description)."""
        url = self.url + PATHS[p.endpoint]
        if not p.stream:
            if isinstance(p.body, bytes):
                r = await client.post(url, content=p.body, headers={"Content-Type": "application/json"})
            else:
                r = await client.post(url, json=p.body)
            return self.judge(p, r.status_code, r.content)
        start = time.perf_counter()
        async with client.stream("POST", url, json=p.body) as r:
            if r.status_code != 200:
                return self.judge(p, r.status_code, await r.aread())
            tap = _Tap(r.aiter_lines(), p.cut_after)
            lines = tap.lines()
            try:
                res = await consume_sse(lines, start, p.endpoint == "chat")
            except ValueError:
                return "error", f"{p.kind}: malformed event {tap.last[:200]!r}"
            finally:
                await lines.aclose()
        if tap.cut:
            return "cut", ""
        if res.error:
            code = (json.loads(tap.last).get("error") or {}).get("code")
            return ("503", "") if code == 503 else ("error", f"{p.kind}: error event {tap.last[:200]}")
        if not tap.done:
            return "error", f"{p.kind}: stream ended without data: [DONE] after {tap.events} events"
        return "ok", ""

    def judge(self, p: Plan, status: int, content: bytes) -> tuple[str, str]:
        if status == 503:
            return "503", ""
        what = f"{p.kind}: HTTP {status} {content[:200]!r}"
        if p.hostile:
            shape = error_shape(content) if 400 <= status < 500 else None
            if shape:
                self.error_shapes[shape] += 1
                return "expected_4xx", ""
            return "error", what
        if not 200 <= status < 300:
            return "error", what
        try:
            body = json.loads(content)
            well_formed = isinstance(body.get("choices"), list) and len(body["choices"]) == p.n
        except (ValueError, AttributeError):
            well_formed = False
        return ("ok", "") if well_formed else ("error", f"{p.kind}: malformed body {content[:200]!r}")

    async def worker(self, client: httpx.AsyncClient, i: int) -> None:
        rng = random.Random(self.ns.seed * 1_000_003 + i)
        while not self.stopping:
            p = self.plan(rng)
            start = time.perf_counter()
            self.in_flight += 1
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the cancellation that
                # ends the run when the request finishes at that moment, and the worker then runs on.
                async with asyncio.timeout(self.ns.request_timeout):
                    cls, what = await self.send(client, p)
            except TimeoutError:
                cls, what = "error", f"{p.kind}: no answer within {self.ns.request_timeout:.0f} s"
            except httpx.HTTPError as e:
                cls, what = "error", f"{p.kind}: {type(e).__name__}: {e}"
            except Exception as e:  # noqa: BLE001 - a client-side failure on a strange answer is an error too
                cls, what = "error", f"{p.kind}: {type(e).__name__}: {e}"
            finally:
                self.in_flight -= 1
            seconds = time.perf_counter() - start
            self.window.append((cls, seconds))
            self.totals[cls] += 1
            if cls == "ok":
                self.latencies.append(seconds)
            if cls == "error" and len(self.errors) < MAX_SAMPLE_ERRORS:
                self.errors.append(what)


def _ms(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 1)


async def server_stats(client: httpx.AsyncClient, url: str) -> dict | None:
    try:
        r = await client.get(f"{url}/get_server_info")
        return r.json()["stats"] if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def print_sample(s: dict) -> None:
    counts = " ".join(f"{c} {s['counts'][c]}" for c in CLASSES)
    lat = f"p50 {s['p50_ms'] or float('nan'):.0f} p99 {s['p99_ms'] or float('nan'):.0f} ms"
    mem = f"mem {s['memory_mib']:.1f} MiB" if s["memory_mib"] is not None else "mem -"
    kv = s["kv"]
    kv_line = (f"kv total {kv['kv_total']} free {kv['kv_free']} cached {kv['kv_cached']} used {kv['kv_used']} "
               f"running {kv['num_running']} waiting {kv['num_waiting']}") if kv else "kv -"
    print(f"[{s['minute']:6.2f} min] {counts} | {lat} | {mem} | {kv_line}", flush=True)


async def soak(url: str, pid: int | None, prompts: list[str], ns: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {ns.api_key}"} if ns.api_key else {}
    limits = httpx.Limits(max_connections=ns.concurrency, max_keepalive_connections=ns.concurrency)
    # Load and monitoring on separate clients: the samples must not queue behind the workers' connections.
    async with httpx.AsyncClient(timeout=None, headers=headers, limits=limits) as load, \
            httpx.AsyncClient(timeout=30, headers=headers) as mon:
        model = (await mon.get(f"{url}/v1/models")).json()["data"][0]["id"]
        print(f"== soak: {url}, model {model}, {ns.concurrency} workers for {ns.duration:.0f} s", flush=True)
        state = Soak(url, model, prompts, ns, headers)
        t0 = time.perf_counter()
        end = t0 + ns.duration
        workers = [asyncio.create_task(state.worker(load, i)) for i in range(ns.concurrency)]
        samples, windows = [], []  # windows: each sample's ok latencies, pooled later for the checks
        try:
            tick = 1
            while True:
                at = min(t0 + tick * ns.interval, end)
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                window, state.window = state.window, []
                ok = [sec for cls, sec in window if cls == "ok"]
                pct = percentiles(ok, "e2e")
                memory, source = tree_memory_mib(pid) if pid else (None, None)
                elapsed = at - t0
                samples.append({"minute": round(elapsed / 60, 2), "elapsed_s": round(elapsed, 1),
                                "counts": {c: sum(cls == c for cls, _ in window) for c in CLASSES},
                                "p50_ms": _ms(pct["e2e_p50_ms"]), "p99_ms": _ms(pct["e2e_p99_ms"]),
                                "memory_mib": None if memory is None else round(memory, 1),
                                "memory_source": source, "kv": await server_stats(mon, url)})
                windows.append(ok)
                print_sample(samples[-1])
                if at >= end:
                    break
                tick += 1
        finally:
            abandoned = state.in_flight
            state.stopping = True
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

        # Idle: everything running or queued has finished (or was aborted on our disconnect).
        idle, idle_after, stats = False, None, None
        for i in range(61):
            stats = await server_stats(mon, url)
            if stats and stats["num_running"] == 0 and stats["num_waiting"] == 0:
                idle, idle_after = True, i
                break
            await asyncio.sleep(1)
        try:
            r = await mon.post(f"{url}/flush_cache")
            flush = {"status": r.status_code, "body": r.text[:200]}
        except httpx.HTTPError as e:
            flush = {"status": None, "body": f"{type(e).__name__}: {e}"}
        final = await server_stats(mon, url)
    return {"model": model, "pid": pid, "samples": samples, "windows": windows, "state": state, "abandoned": abandoned,
            "idle": idle, "idle_after_s": idle_after, "stats_before_flush": stats, "flush": flush, "final": final}


def drift(values_base: list[float], values_last: list[float]) -> float | None:
    if not values_base or not values_last or not sum(values_base):
        return None
    return 100.0 * (sum(values_last) / len(values_last) / (sum(values_base) / len(values_base)) - 1.0)


def checks(run: dict) -> list[dict]:
    samples, windows, state = run["samples"], run["windows"], run["state"]
    n = len(samples)
    base, last = slice(round(n / 6), round(n / 3)), slice(n - round(n / 6), n)
    span = f"samples {base.start + 1}-{base.stop} vs {last.start + 1}-{last.stop} of {n}"
    out = [{"name": "errors == 0", "pass": state.totals["error"] == 0, "value": state.totals["error"]}]
    final = run["final"]
    all_free = bool(final) and final["kv_free"] == final["kv_total"]
    out.append({"name": "KV all free after the flush", "pass": all_free,
                "value": final and {k: final[k] for k in ("kv_total", "kv_free", "kv_cached", "kv_used")}})
    mem_base = [s["memory_mib"] for s in samples[base] if s["memory_mib"] is not None]
    mem_last = [s["memory_mib"] for s in samples[last] if s["memory_mib"] is not None]
    mem = drift(mem_base, mem_last)
    if run["pid"] is None:
        out.append({"name": "memory drift < 5 %", "pass": None, "value": None,
                    "detail": "skipped: the server's pid is unknown (--pid)"})
    else:
        out.append({"name": "memory drift < 5 %", "pass": mem is not None and mem < 5.0,
                    "value": None if mem is None else round(mem, 2),
                    "detail": f"mean {sum(mem_base) / max(len(mem_base), 1):.1f} -> "
                              f"{sum(mem_last) / max(len(mem_last), 1):.1f} MiB, {span}"})
    p99 = [percentiles([x for w in windows[sl] for x in w], "e2e")["e2e_p99_ms"] for sl in (base, last)]
    p99_drift = None if any(math.isnan(x) for x in p99) else 100.0 * (p99[1] / p99[0] - 1.0)
    out.append({"name": "p99 drift <= 10 %", "pass": p99_drift is not None and p99_drift <= 10.0,
                "value": None if p99_drift is None else round(p99_drift, 2),
                "detail": f"p99 {p99[0]:.0f} -> {p99[1]:.0f} ms, {span}"})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default=None, help="a running server (default: start one on --port)")
    ap.add_argument("--pid", type=int, default=None, help="the --base-url server's main pid, for its memory")
    ap.add_argument("--port", type=int, default=30170)
    ap.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=1800, help="seconds of load")
    ap.add_argument("--interval", type=float, default=60, help="seconds between samples")
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="tokenizer for the prompts (default: the default model's)")
    ap.add_argument("--out", default="benchmarks/soak.json")
    ap.add_argument("--radixserve-args", nargs=argparse.REMAINDER, default=[],
                    help="flags for `radixserve serve` (last on the command line)")
    ns = ap.parse_args()
    if ns.duration < 6 * ns.interval:
        ap.error("--duration must cover at least 6 --interval samples (the drift checks compare sixths of the run)")
    if ns.pid is not None and ns.base_url is None:
        ap.error("--pid goes with --base-url (the pid of a server started here is known)")

    from radixserve.config import default_model_path
    from radixserve.model_files import load_tokenizer

    prompts = make_prompts("random", PROMPT_POOL, PROMPT_TOKENS, load_tokenizer(ns.tokenizer or default_model_path()),
                           ns.seed)
    server = None
    try:
        if ns.base_url is None:
            server = Server("radixserve", ns.port, None, ns.radixserve_args)
            print(f"== starting radixserve on port {ns.port} (log /tmp/radixserve-matrix-{ns.port}.log)", flush=True)
            server.start()
            url, pid = server.url, server.proc.pid
        else:
            url, pid = ns.base_url.rstrip("/"), ns.pid
        run = asyncio.run(soak(url, pid, prompts, ns))
    finally:
        if server is not None and server.proc is not None:
            tree = process_tree(server.proc.pid)
            try:
                server.stop()
            except subprocess.TimeoutExpired:  # graceful stop hung: don't leave it behind
                server.proc.kill()
                server.proc.wait()
            left = [p for p in tree[1:] if os.path.exists(f"/proc/{p}")]
            if left:
                print(f"!! the server left processes behind: {left}; killing them", flush=True)
                for p in left:
                    try:
                        os.kill(p, 9)
                    except OSError:
                        pass

    state = run["state"]
    results = checks(run)
    lat = percentiles(state.latencies, "e2e")
    summary = {"totals": {c: state.totals[c] for c in CLASSES}, "requests": sum(state.totals.values()),
               "abandoned_at_end": run["abandoned"], "ok_p50_ms": _ms(lat["e2e_p50_ms"]),
               "ok_p99_ms": _ms(lat["e2e_p99_ms"]), "error_body_shapes": dict(state.error_shapes),
               "idle": run["idle"], "idle_after_s": run["idle_after_s"],
               "stats_before_flush": run["stats_before_flush"], "flush": run["flush"], "final_stats": run["final"]}
    print(f"\n== {summary['requests']} requests in {ns.duration:.0f} s: "
          + ", ".join(f"{c} {n}" for c, n in summary["totals"].items())
          + f"; {run['abandoned']} in flight at the end (abandoned)")
    print(f"ok latency p50 {lat['e2e_p50_ms']:.0f} ms, p99 {lat['e2e_p99_ms']:.0f} ms; hostile error bodies: "
          f"{dict(state.error_shapes)}")
    print(f"idle after the load: {run['idle']} ({run['idle_after_s']} s); flush: HTTP {run['flush']['status']}; "
          f"final stats: {run['final']}")
    for c in results:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[c["pass"]]
        print(f"{verdict}  {c['name']}: {c['value']}" + (f" ({c['detail']})" if c.get("detail") else ""))
    for e in state.errors:
        print(f"   error: {e}")
    args = {**vars(ns), "api_key": "***" if ns.api_key else None}
    with open(ns.out, "w") as f:
        json.dump({"args": args, "model": run["model"], "samples": run["samples"], "summary": summary,
                   "checks": results, "sample_errors": state.errors}, f, indent=2)
    print(f"wrote {ns.out}")
    return 0 if all(c["pass"] is not False for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())

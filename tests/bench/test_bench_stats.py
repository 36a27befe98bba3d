"""The benchmark client's measurements and statistics, on fake streams and fake clocks (no timing)."""
from __future__ import annotations

import asyncio
import json
import math

import pytest

from radixserve.bench.client import consume_sse, make_prompts
from radixserve.bench.run import _servers
from radixserve.bench.stats import RequestResult, summarize


def _lines(events: list) -> list[str]:
    out = []
    for e in events:
        out += [f"data: {e if isinstance(e, str) else json.dumps(e)}", ""]
    return out


async def _aiter(items):
    for x in items:
        yield x


def _clock(times: list[float]):
    it = iter(times)
    return lambda: next(it)


def _consume(events, times, chat=False, start=0.0) -> RequestResult:
    return asyncio.run(consume_sse(_aiter(_lines(events)), start, chat, clock=_clock(times)))


def text(t: str) -> dict:
    return {"choices": [{"index": 0, "text": t}]}


def test_ttft_itl_e2e_and_usage_tokens():
    usage = {"choices": [], "usage": {"prompt_tokens": 200, "completion_tokens": 7,
                                      "prompt_tokens_details": {"cached_tokens": 150}}}
    # clock reads: one per data event, then the end
    res = _consume([text("a"), text(""), text("b"), text("cd"), usage, "[DONE]"], [1.0, 1.2, 1.5, 2.0, 2.1, 2.2],
                   start=0.5)
    assert res.ok and res.error == ""
    assert res.ttft == pytest.approx(0.5)
    assert res.itls == pytest.approx([0.5, 0.5])  # the empty chunk is not a token arrival
    assert res.e2e == pytest.approx(1.7)
    assert (res.prompt_tokens, res.output_tokens, res.cached_tokens) == (200, 7, 150)


def test_chat_deltas_and_tokens_counted_without_usage():
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    delta = lambda t: {"choices": [{"index": 0, "delta": {"content": t}}]}  # noqa: E731
    res = _consume([role, delta("x"), delta("y"), "[DONE]"], [0.1, 0.3, 0.4, 0.5], chat=True)
    assert res.ok and res.ttft == pytest.approx(0.3) and res.itls == pytest.approx([0.1])
    assert res.output_tokens == 2 and res.prompt_tokens == 0


def test_error_event_and_empty_stream_are_failures():
    res = _consume([text("a"), {"error": {"message": "engine died", "code": 503}}, "[DONE]"], [0.1, 0.2, 0.3])
    assert not res.ok and res.error == "engine died"
    assert not _consume(["[DONE]"], [0.1]).ok


def test_summary_throughput_percentiles_and_cache_rate():
    results = [RequestResult(ok=True, prompt_tokens=100, output_tokens=10, cached_tokens=50, ttft=t,
                             itls=[0.01 * (i + 1)] * 4, e2e=1.0 + t) for i, t in enumerate([0.1, 0.2, 0.3, 0.4])]
    results.append(RequestResult(error="HTTP 503"))
    s = summarize(results, duration=2.0)
    assert (s["completed"], s["failed"]) == (4, 1)
    assert s["request_throughput"] == pytest.approx(2.0)
    assert s["output_throughput"] == pytest.approx(20.0)
    assert s["total_throughput"] == pytest.approx(220.0)
    assert s["cache_hit_rate"] == pytest.approx(0.5)
    assert s["ttft_p50_ms"] == pytest.approx(250.0)
    assert s["ttft_p99_ms"] == pytest.approx(100 * (1 + 3 * 0.99))  # linear interpolation, numpy's default
    assert s["itl_p50_ms"] == pytest.approx(25.0) and s["itl_p90_ms"] == pytest.approx(40.0)
    assert s["e2e_p50_ms"] == pytest.approx(1250.0)


def test_summary_of_nothing():
    s = summarize([RequestResult(error="x")], duration=1.0)
    assert s["completed"] == 0 and s["output_throughput"] == 0 and math.isnan(s["ttft_p50_ms"])


def test_workloads(tokenizer, tmp_path):
    rand = make_prompts("random", 4, 50, tokenizer, seed=1)
    assert len(set(rand)) == 4
    assert all(40 <= len(tokenizer.encode(p)) <= 60 for p in rand)
    assert make_prompts("random", 4, 50, tokenizer, seed=1) == rand  # seeded
    shared = make_prompts("shared-prefix", 3, 50, tokenizer, seed=1, prefix_len=100)
    prefix = shared[0].split("\nQuestion 0:")[0]
    assert all(p.startswith(prefix + "\nQuestion") for p in shared) and len(set(shared)) == 3
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n"b"\n')
    assert make_prompts(str(f), 5, 0, tokenizer, seed=0) == ["a", "b", "a", "b", "a"]


def test_server_specs():
    assert _servers(["http://h:1/", "vllm=http://h:2"]) == [("http://h:1/", "http://h:1"), ("vllm", "http://h:2")]

"""Per-request measurements of a serving benchmark and their summary (throughput, latency percentiles)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    ttft: float = 0.0  # seconds from sending to the first generated text
    itls: list[float] = field(default_factory=list)  # seconds between successive text chunks
    e2e: float = 0.0


def percentiles(values: list[float], prefix: str) -> dict[str, float]:
    if not values:
        return {f"{prefix}_{p}_ms": float("nan") for p in ("p50", "p90", "p99")}
    p50, p90, p99 = np.percentile(np.asarray(values) * 1000.0, [50, 90, 99])
    return {f"{prefix}_p50_ms": float(p50), f"{prefix}_p90_ms": float(p90), f"{prefix}_p99_ms": float(p99)}


def summarize(results: list[RequestResult], duration: float) -> dict[str, float]:
    """Aggregate figures of one benchmark level; duration is the wall time of the whole level."""
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens for r in done)
    summary = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration,
        "request_throughput": len(done) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_throughput": (out_tokens + prompt_tokens) / duration if duration else 0.0,
        "cache_hit_rate": sum(r.cached_tokens for r in done) / prompt_tokens if prompt_tokens else 0.0,
    }
    summary.update(percentiles([r.ttft for r in done], "ttft"))
    summary.update(percentiles([x for r in done for x in r.itls], "itl"))
    summary.update(percentiles([r.e2e for r in done], "e2e"))
    return summary

"""Per-request sampling parameters with validation: part of the contract between the API process and
the engine (torch-free). Every limit a request is checked against is defined here, once; the OpenAI
protocol's pydantic fields reference these constants."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

# Temperatures below this are treated as greedy: dividing logits by a tiny
# temperature overflows float32 and would turn the softmax into NaNs.
GREEDY_TEMPERATURE = 1e-5
# New tokens when a request sets none: SGLang's native API and the offline Engine. The OpenAI routes
# default to --default-max-tokens (16, as OpenAI's completions API does) instead.
DEFAULT_MAX_NEW_TOKENS = 128
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's limit)
MAX_N = 128  # sequences per prompt
OPENAI_MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]; SGLang's native API takes any finite value >= 0
PENALTY_RANGE = (-2.0, 2.0)  # frequency_penalty and presence_penalty
MAX_REPETITION_PENALTY = 2.0  # repetition_penalty is in (0, this]
GRAMMAR_KINDS = ("json_schema", "regex", "ebnf", "structural_tag")
# Every integer crosses to the engine as msgpack and lands in int64 tensors (the sampler mixes seeds as
# int64): a value outside this range is the client's error, never an overflow inside the server.
INT64_RANGE = (-(2**63), 2**63 - 1)
MAX_STOP = 64  # stop strings per request; each is searched for in the output after every token
MAX_STOP_TOKEN_IDS = 1024


def _is_int(v: Any) -> bool:
    """An int (not a bool) that fits int64."""
    return isinstance(v, int) and not isinstance(v, bool) and INT64_RANGE[0] <= v <= INT64_RANGE[1]


def sample_seed(seed: int | None, i: int) -> int | None:
    """The seed of the i-th of a request's n samples: seed + i, wrapped into int64."""
    if seed is None:
        return None
    return (seed + i - INT64_RANGE[0]) % 2**64 + INT64_RANGE[0]


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    # Output constraints (at most one), enforced token by token: a JSON schema (as JSON text), a regex,
    # an EBNF grammar, or an xgrammar structural tag (as JSON text; tool calls are built this way).
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        # OpenAI-style clients send a single stop string; normalise so the
        # rest of the engine only ever sees a list.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        # Python callers may give a schema or structural tag as a dict; the engine keys them by text.
        for name in ("json_schema", "structural_tag"):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, json.dumps(getattr(self, name)))
        if isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        # Alternatives are meaningless without the chosen token's logprob.
        if _is_int(self.top_logprobs) and self.top_logprobs > 0:
            self.logprobs = True

    def validate(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        def real_in(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            v = getattr(self, name)
            if not _is_real(v):
                raise bad(name, "a number")
            ok_lo = v > lo if lo_open else v >= lo
            # Written as a positive test so NaN fails it.
            if not (ok_lo and v <= hi):
                rule = f"in {'(' if lo_open else '['}{lo}, {hi}]"
                raise bad(name, rule)

        if not _is_int(self.max_new_tokens):
            raise bad("max_new_tokens", "an int in int64's range")
        if self.max_new_tokens < 0:
            raise bad("max_new_tokens", ">= 0")
        if not _is_real(self.temperature):
            raise bad("temperature", "a number")
        if not self.temperature >= 0:
            raise bad("temperature", ">= 0")
        if not math.isfinite(self.temperature):
            raise bad("temperature", "finite")
        real_in("top_p", 0.0, 1.0, lo_open=True)
        if not _is_int(self.top_k):
            raise bad("top_k", "an int")
        if self.top_k != -1 and self.top_k < 1:
            raise bad("top_k", "-1 (disabled) or >= 1")
        real_in("min_p", 0.0, 1.0)
        real_in("frequency_penalty", *PENALTY_RANGE)
        real_in("presence_penalty", *PENALTY_RANGE)
        real_in("repetition_penalty", 0.0, MAX_REPETITION_PENALTY, lo_open=True)
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", f"an int in [{INT64_RANGE[0]}, {INT64_RANGE[1]}] or None")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a list of non-empty strings")
        if len(self.stop) > MAX_STOP:
            raise bad("stop", f"at most {MAX_STOP} strings")
        if not isinstance(self.stop_token_ids, list) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise bad("stop_token_ids", "a list of non-negative ints")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise bad("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids")
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")
        if not _is_int(self.top_logprobs):
            raise bad("top_logprobs", "an int")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"in [0, {MAX_TOP_LOGPROBS}]")
        if self.top_logprobs > 0 and not self.logprobs:
            raise bad("logprobs", "True when top_logprobs > 0")
        if not _is_int(self.n):
            raise bad("n", "an int")
        if not 1 <= self.n <= MAX_N:
            raise bad("n", f"in [1, {MAX_N}]")
        given = [name for name in GRAMMAR_KINDS if getattr(self, name) is not None]
        for name in given:
            if not isinstance(getattr(self, name), str):
                raise bad(name, "a string")
        if len(given) > 1:
            raise ValueError(f"give at most one output constraint; got {', '.join(given)}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "SamplingParams":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if k not in known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(map(str, unknown))}")
        params = cls(**d)
        params.validate()
        return params

    @property
    def grammar(self) -> tuple[str, str] | None:
        """(kind, spec) of the output constraint, if any."""
        for kind in GRAMMAR_KINDS:
            spec = getattr(self, kind)
            if spec is not None:
                return kind, spec
        return None

    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

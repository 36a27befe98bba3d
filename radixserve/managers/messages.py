"""The whole contract between the API process and the engine process: typed msgspec messages over ZMQ,
and what they carry, both torch-free: `sampling/params.py`'s SamplingParams and `config.py`'s ServerArgs
(as a dict in EngineStart). Nothing else crosses between the processes.

Start-up: the launcher writes `EngineStart` (JSON) to the engine's stdin; the engine answers on the
ready socket with `EngineReady` (its `EngineInfo`) or `EngineFailed`. Then `EngineInput` messages flow
in and `EngineOutput` messages flow out."""
from __future__ import annotations

import msgspec

from radixserve.sampling.params import SamplingParams


class LoRAAdapterInfo(msgspec.Struct):
    id: int
    name: str
    path: str
    pinned: bool = False


class EngineStart(msgspec.Struct):
    """How the launcher starts an engine process: its options and where to talk."""

    args: dict  # ServerArgs as a dict (dataclasses.asdict)
    in_addr: str  # requests: the engine binds a PULL socket here
    out_addr: str  # outputs: the engine binds a PUSH socket here
    ready_addr: str  # the handshake: the engine connects a PUSH socket here and sends one message


class EngineInfo(msgspec.Struct):
    """What the API process knows of the served model, sent once by the engine when it is ready."""

    context_length: int  # prompt + output tokens per request at most
    vocab_size: int
    architecture: str
    dtype: str
    device: str
    max_total_tokens: int  # KV pool size in tokens (0 for an encoder: it keeps no KV)
    is_generation: bool
    eos_token_ids: list[int] = []
    loras: list[LoRAAdapterInfo] = []  # adapters loaded at start (--lora-paths)
    # Embedding models only:
    embedding_dim: int | None = None
    pooling: str | None = None  # e.g. "mean", "cls", "lasttoken" ("+"-joined when concatenated)
    normalized: bool | None = None
    matryoshka_dimensions: list[int] | None = None
    do_lower_case: bool = False  # texts are lower-cased before tokenization


class EngineReady(msgspec.Struct, tag=True):
    info: EngineInfo


class EngineFailed(msgspec.Struct, tag=True):
    """The engine could not start (bad model files, unsupported architecture, no memory...)."""

    error: str


class GenerateReq(msgspec.Struct, tag=True):
    rid: str
    input_ids: list[int]
    params: SamplingParams
    group: str | None = None  # the n samples of one prompt share a group: its KV is computed once
    namespace: str | None = None  # prefix-cache namespace (cache_salt, LoRA adapter)
    prompt_logprobs: bool = False  # logprobs (top: params.top_logprobs) of the prompt's tokens too
    lora_id: int = 0  # the LoRA adapter (ids from LoRAUpdateOutput.adapters; 0: the base model)


class EmbedReq(msgspec.Struct, tag=True):
    """One text to embed (the engine batches texts of any requests together)."""

    rid: str
    input_ids: list[int]
    dimensions: int | None = None  # truncate (Matryoshka) to this many dimensions


class EmbedBatch(msgspec.Struct, tag=True):
    """A request's texts in one message, so that the engine receives them together (one step when they
    fit its budget) and the API process makes one send instead of one per text."""

    reqs: list[EmbedReq]


class AbortReq(msgspec.Struct, tag=True):
    rid: str


class FlushCacheReq(msgspec.Struct, tag=True):
    pass


class StatsReq(msgspec.Struct, tag=True):
    pass


class LoadLoRAReq(msgspec.Struct, tag=True):
    req_id: str
    name: str
    path: str
    pinned: bool = False


class UnloadLoRAReq(msgspec.Struct, tag=True):
    """Answered once the adapter's running and queued requests have finished."""

    req_id: str
    name: str


class LoRAUpdateOutput(msgspec.Struct, tag=True):
    """The answer to LoadLoRAReq / UnloadLoRAReq, with the adapters loaded afterwards."""

    req_id: str
    success: bool
    message: str = ""
    not_found: bool = False  # unload of a name that is not loaded
    adapters: list[LoRAAdapterInfo] = []


class TokenOutput(msgspec.Struct):
    """What one request produced in one step: a token, or only a finish/error, or an embedding."""

    rid: str
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    matched_stop: int | None = None  # the stop token id (EOS or stop_token_ids)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None  # with the first token
    embedding: bytes | None = None  # an EmbedReq's result: little-endian float32


class BatchOutput(msgspec.Struct, tag=True):
    outputs: list[TokenOutput]


class Stats(msgspec.Struct, tag=True):
    """Engine state, answered to StatsReq and FlushCacheReq."""

    num_running: int
    num_waiting: int
    kv_total: int
    kv_free: int
    kv_cached: int
    flushed: bool = False


EngineInput = GenerateReq | EmbedReq | EmbedBatch | AbortReq | FlushCacheReq | StatsReq | LoadLoRAReq | UnloadLoRAReq
EngineOutput = BatchOutput | Stats | LoRAUpdateOutput
EngineHandshake = EngineReady | EngineFailed

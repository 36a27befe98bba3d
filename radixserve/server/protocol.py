"""Pydantic models of the OpenAI API (and SGLang's extensions): requests validated, responses typed."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from radixserve.sampling.params import (MAX_N, MAX_REPETITION_PENALTY, MAX_TOP_LOGPROBS, OPENAI_MAX_TEMPERATURE,
                                        PENALTY_RANGE, SamplingParams)


class _Request(BaseModel):
    # Unknown fields are an error (naming the field), never silently ignored: a constraint or
    # option we do not implement must not produce unconstrained output.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaSpec(_Request):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(True, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema must be given exactly when type is 'json_schema'")
        return self


class _Sampling(_Request):
    """Parameters shared by chat and completions (OpenAI's, then SGLang/vLLM's extensions)."""

    model: str
    temperature: float | None = Field(None, ge=0, le=OPENAI_MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    frequency_penalty: float | None = Field(None, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    presence_penalty: float | None = Field(None, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    repetition_penalty: float | None = Field(None, gt=0, le=MAX_REPETITION_PENALTY)
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    return_cached_tokens_details: bool = False
    # Output constraints: OpenAI's response_format, SGLang's regex and ebnf (at most one).
    response_format: ResponseFormat | None = None
    regex: str | None = None
    ebnf: str | None = None
    lora_path: str | None = None  # a loaded LoRA adapter's name, or an adapter folder to load (SGLang)
    # Accepted for compatibility with OpenAI clients; they do not change generation.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    @model_validator(mode="after")
    def _check_common(self):
        if self.top_k is not None and self.top_k != -1 and self.top_k < 1:
            raise ValueError("top_k must be -1 (disabled) or >= 1")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        given = [name for name, on in (("response_format", self.response_format is not None
                                         and self.response_format.type != "text"),
                                        ("regex", self.regex is not None), ("ebnf", self.ebnf is not None)) if on]
        if len(given) > 1:
            raise ValueError(f"give at most one output constraint; got {', '.join(given)}")
        return self

    def output_constraint(self) -> dict[str, str]:
        """response_format / regex / ebnf as SamplingParams fields (the engine checks them)."""
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            return {"json_schema": json.dumps({"type": "object"})}
        if fmt is not None and fmt.type == "json_schema":
            return {"json_schema": json.dumps(fmt.json_schema.schema_)}
        if self.regex is not None:
            return {"regex": self.regex}
        if self.ebnf is not None:
            return {"ebnf": self.ebnf}
        return {}

    def _sampling_params(self, max_new_tokens: int, logprobs: bool, top_logprobs: int,
                         constraint: dict[str, str] | None) -> SamplingParams:
        """The engine's parameters; a setting the request leaves out keeps SamplingParams' default."""
        values = {
            "max_new_tokens": max_new_tokens, "n": self.n, "stop": self.stop or [],
            "stop_token_ids": self.stop_token_ids or [], "seed": self.seed, "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens, "logprobs": logprobs,
            "top_logprobs": top_logprobs, **(self.output_constraint() if constraint is None else constraint),
        }
        for name in ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                values[name] = value
        return SamplingParams.from_dict(values)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ToolCallFunction(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: FunctionName


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    separate_reasoning: bool = True  # with --reasoning-parser: reasoning_content apart from content

    @model_validator(mode="after")
    def _check_tools(self):
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if self.tool_choice is not None and self.tool_choice != "none" and not names:
            raise ValueError("tool_choice is only allowed when tools are given")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names the function {self.tool_choice.function.name!r}, which is not "
                             f"among the tools ({', '.join(names)})")
        forced = self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        if forced and (self.regex is not None or self.ebnf is not None or (
                self.response_format is not None and self.response_format.type != "text")):
            raise ValueError("a required or named tool_choice cannot be combined with another output constraint")
        return self

    @property
    def tool_mode(self) -> str:
        """none | auto | required | named: what the tools (if any) mean for this request."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def to_sampling_params(self, max_new_tokens: int, constraint: dict[str, str] | None = None) -> SamplingParams:
        """constraint: one the endpoint built itself (tool calls), instead of the request's own."""
        return self._sampling_params(max_new_tokens, self.logprobs, self.top_logprobs or 0, constraint)

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.continue_final_message and self.add_generation_prompt:
            # As in vLLM: continuing the last message and opening a new one are exclusive.
            self.add_generation_prompt = False
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message requires the last message to be from the assistant")
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = Field(None, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt_shape(cls, v):
        def ids(x):
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(v, str) or (isinstance(v, list) and v and (
                all(isinstance(p, str) for p in v) or ids(v) or all(ids(p) and p for p in v))):
            return v
        raise ValueError("must be a string, a list of strings, a list of token ids, or a list of "
                         "non-empty token-id lists")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def to_sampling_params(self, max_new_tokens: int) -> SamplingParams:
        return self._sampling_params(max_new_tokens, self.logprobs is not None, self.logprobs or 0, None)

    @model_validator(mode="after")
    def _check_completion(self):
        if self.suffix:
            raise ValueError("suffix is not supported (no fill-in-the-middle for this model)")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        return self


_EMBEDDING_INPUT_SHAPE = "must be a string, a list of strings, a list of token ids, or a list of token-id lists"


class EmbeddingRequest(_Request):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # checked against the model (Matryoshka sizes) by the handler
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _check_input(cls, v):
        def is_id(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if isinstance(v, str):
            if not v:
                raise ValueError("must not be an empty string")
            return v
        if not isinstance(v, list):
            raise ValueError(_EMBEDDING_INPUT_SHAPE)
        if not v:
            raise ValueError("must not be an empty list")
        if all(isinstance(x, str) for x in v):
            empty = next((i for i, x in enumerate(v) if not x), None)
            if empty is not None:
                raise ValueError(f"item {empty} is an empty string")
            return v
        if all(is_id(x) for x in v):
            return v
        if all(isinstance(x, list) and all(is_id(t) for t in x) for x in v):
            empty = next((i for i, x in enumerate(v) if not x), None)
            if empty is not None:
                raise ValueError(f"item {empty} is an empty list of token ids")
            return v
        raise ValueError(_EMBEDDING_INPUT_SHAPE)


# ---- responses


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _always_content(self, handler):
        # OpenAI sends "content": null when the answer is only tool calls; keep the key.
        out = handler(self)
        out.setdefault("content", self.content)
        return out


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None
    matched_stop: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    matched_stop: str | int | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "radixserve"
    root: str
    parent: str | None = None
    max_model_len: int
    is_generation: bool = True  # False for an embedding model (it serves /v1/embeddings only)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class GenerateRequest(_Request):
    """SGLang's native /generate."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | None = None
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    rid: str | None = None
    lora_path: str | list[str | None] | None = None  # per prompt when a list (None: the base model)

    @model_validator(mode="after")
    def _one_input(self):
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text and input_ids")
        return self

    def to_sampling_params(self) -> SamplingParams:
        """sampling_params in SGLang's names (max_new_tokens defaults to DEFAULT_MAX_NEW_TOKENS);
        return_logprob asks for the sampled tokens' logprobs with top_logprobs_num alternatives."""
        values = dict(self.sampling_params or {})
        if self.return_logprob:
            values.setdefault("logprobs", True)
            values.setdefault("top_logprobs", self.top_logprobs_num)
        return SamplingParams.from_dict(values)


class LoadLoRAAdapterRequest(_Request):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    pinned: bool = False


class UnloadLoRAAdapterRequest(_Request):
    lora_name: str = Field(min_length=1)


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]

"""Pydantic models of the OpenAI API's requests (and SGLang's extensions), validated against their real
limits; the responses are in server/responses.py."""
from __future__ import annotations

import json
from typing import Annotated, Any, Callable, Literal

from pydantic import AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field, Strict, field_validator, model_validator

from radixserve.sampling.params import (GRAMMAR_KINDS, MAX_N, MAX_REPETITION_PENALTY, MAX_STOP, MAX_STOP_TOKEN_IDS,
                                        MAX_TOP_LOGPROBS, OPENAI_MAX_TEMPERATURE, PENALTY_RANGE, SamplingParams)

# The request shapes' limits (the sampling limits are SamplingParams'). They bound what one request can
# make the server do before the engine sees it; the body size (--max-body-bytes) bounds the rest.
MAX_PROMPTS = 2048  # prompts (or embedding inputs) in one request, as OpenAI's embeddings API
MAX_MESSAGES = 4096
MAX_TOOLS = 128  # OpenAI's limit
MAX_NAME_CHARS = 256  # model and adapter names, user ids, tool call ids
MAX_PATH_CHARS = 4096
MAX_GRAMMAR_CHARS = 65536  # regex / EBNF sources: compiled by the engine before the request runs
MAX_TOKEN_ID = 2**31 - 1  # the schema's bound; the model's vocabulary is checked when the request arrives
# Integers a request may give, beyond which JSON numbers lose precision in most clients and schema
# validators (doubles); within the engine's int64.
MAX_INT = 2**53 - 1


def _is_integer(v: Any) -> bool:
    """An integer as JSON Schema counts them: 3 and 3.0, not true or "3"."""
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def _integral(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def integer(ge: int, le: int, **schema: Any) -> Any:
    """An integer field's type with its range (in the type, so that the schema states it). Strict: JSON
    true/false and strings are not numbers (pydantic's lax mode would read true as 1 and "3" as 3); 3.0
    is the integer 3, as in JSON Schema."""
    return Annotated[int, Strict(), Field(ge=ge, le=le, json_schema_extra=schema or None), BeforeValidator(_integral)]


Float = Annotated[float, Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]  # true or false only (lax mode would take "yes", 1, "off")
# x-token-id: the published schema bounds these by the served model's vocabulary (server/openapi.py).
TokenId = integer(0, MAX_TOKEN_ID, **{"x-token-id": True})
TopK = Literal[-1] | integer(1, MAX_INT)  # -1: off
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
Text = Annotated[str, Field(min_length=1)]  # a prompt or a stop string: never empty
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
# A batch: strings, one prompt's token ids, or several prompts' token ids.
Prompts = Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds | Annotated[
    list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]


class _Request(BaseModel):
    # Unknown fields are an error (naming the field), never silently ignored: a constraint or
    # option we do not implement must not produce unconstrained output.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: Bool = False
    continuous_usage_stats: Bool = False


class JsonSchemaSpec(_Request):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(True, alias="schema")
    strict: Bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema must be given exactly when type is 'json_schema'")
        return self


def _given(name: str, value: dict | None = None) -> dict:
    """JSON Schema: the request has `name`, not null (and matching `value` when given)."""
    return {"required": [name], "properties": {name: value or {"not": {"type": "null"}}}}


def _rules(*rules: dict) -> Callable[[dict], None]:
    """The cross-field rules of a request (its validators enforce them) stated in its JSON schema too."""
    def add(schema: dict) -> None:
        schema["allOf"] = list(rules)
    return add


_CONSTRAINTS = [_given("response_format", {"type": "object", "required": ["type"],
                                           "properties": {"type": {"enum": ["json_object", "json_schema"]}}}),
                _given("regex"), _given("ebnf")]
# stream_options only when streaming; at most one output constraint.
_SAMPLING_RULES = (
    {"if": _given("stream_options"), "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}},
    *({"not": {"allOf": [a, b]}} for i, a in enumerate(_CONSTRAINTS) for b in _CONSTRAINTS[i + 1:]),
)


class _Filters(_Request):
    """The sampling filters and penalties, named and bounded alike in the OpenAI routes and /generate."""

    top_p: Float | None = Field(None, gt=0, le=1)
    top_k: TopK | None = None
    min_p: Float | None = Field(None, ge=0, le=1)
    frequency_penalty: Float | None = Field(None, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    presence_penalty: Float | None = Field(None, ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])
    repetition_penalty: Float | None = Field(None, gt=0, le=MAX_REPETITION_PENALTY)


class _Sampling(_Filters):
    """Parameters shared by chat and completions (OpenAI's, then SGLang/vLLM's extensions)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_rules(*_SAMPLING_RULES))

    model: Name
    temperature: Float | None = Field(None, ge=0, le=OPENAI_MAX_TEMPERATURE)
    max_tokens: integer(1, MAX_INT) | None = None
    n: integer(1, MAX_N) = 1
    stop: str | Annotated[list[Text], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    seed: integer(-MAX_INT, MAX_INT) | None = None
    ignore_eos: Bool = False
    skip_special_tokens: Bool = True
    spaces_between_special_tokens: Bool = True
    stream: Bool = False
    stream_options: StreamOptions | None = None
    user: Name | None = None
    return_cached_tokens_details: Bool = False
    # Output constraints: OpenAI's response_format, SGLang's regex and ebnf (at most one).
    response_format: ResponseFormat | None = None
    regex: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS)
    ebnf: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS)
    # A loaded LoRA adapter's name, or an adapter folder to load (SGLang; needs --enable-lora-runtime-loading).
    lora_path: str | None = Field(None, max_length=MAX_PATH_CHARS)
    # Accepted for compatibility with OpenAI clients; they do not change generation.
    store: Bool | None = None
    metadata: dict[Name, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)  # OpenAI's limits
    service_tier: Name | None = None

    @model_validator(mode="after")
    def _check_common(self):
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
    name: Name
    arguments: str


class ToolCall(BaseModel):
    id: Name
    type: Literal["function"] = "function"
    function: ToolCallFunction


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: Bool | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(_Request):
    name: Name


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: FunctionName


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: Name | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: Name | None = None
    reasoning_content: str | None = None

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content


class ChatCompletionRequest(_Sampling):
    # top_logprobs needs logprobs; tool_choice (other than "none") needs tools.
    model_config = ConfigDict(extra="forbid", json_schema_extra=_rules(
        *_SAMPLING_RULES,
        {"if": _given("top_logprobs", {"type": "integer", "minimum": 1}),
         "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}},
        {"if": _given("tool_choice", {"not": {"enum": ["none", None]}}),
         "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}}))

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: integer(1, MAX_INT) | None = None
    logprobs: Bool = False
    top_logprobs: integer(0, MAX_TOP_LOGPROBS) | None = None
    add_generation_prompt: Bool = True
    continue_final_message: Bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: Bool = True
    separate_reasoning: Bool = True  # with --reasoning-parser: reasoning_content apart from content

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
    model_config = ConfigDict(extra="forbid", json_schema_extra=_rules(
        *_SAMPLING_RULES, {"properties": {"suffix": {"anyOf": [{"type": "null"}, {"maxLength": 0}]}}}))

    prompt: Text | Prompts
    best_of: integer(1, MAX_N) | None = None
    echo: Bool = False
    logprobs: integer(0, MAX_TOP_LOGPROBS) | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt_shape(cls, v):
        def ids(x):
            return isinstance(x, list) and all(_is_integer(t) for t in x)

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
    model: Name
    input: Text | Prompts
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: integer(1, MAX_INT) | None = None  # checked against the model (Matryoshka sizes) by the handler
    user: Name | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _check_input(cls, v):
        def is_id(x) -> bool:
            return _is_integer(x)

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


class NativeSamplingParams(_Filters):
    """/generate's sampling_params: SamplingParams' fields in SGLang's names (its validate() has the last
    word; these types and ranges state the same contract in the schema)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_rules(  # at most one output constraint
        *({"not": {"allOf": [_given(a), _given(b)]}} for i, a in enumerate(GRAMMAR_KINDS) for b in GRAMMAR_KINDS[i + 1:])))

    max_new_tokens: integer(0, MAX_INT) | None = None
    temperature: Float | None = Field(None, ge=0)
    seed: integer(-MAX_INT, MAX_INT) | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: Bool | None = None
    skip_special_tokens: Bool | None = None
    spaces_between_special_tokens: Bool | None = None
    logprobs: Bool | None = None
    top_logprobs: integer(0, MAX_TOP_LOGPROBS) | None = None
    n: integer(1, MAX_N) | None = None
    json_schema: str | dict[str, Any] | None = None
    regex: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS)
    ebnf: str | None = Field(None, max_length=MAX_GRAMMAR_CHARS)
    structural_tag: str | dict[str, Any] | None = None


class GenerateRequest(_Request):
    """SGLang's native /generate."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_rules(  # exactly one of text and input_ids
        {"oneOf": [_given("text"), _given("input_ids")]}))

    text: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)] | None = None
    input_ids: TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)] | None = None
    sampling_params: NativeSamplingParams | None = None
    stream: Bool = False
    return_logprob: Bool = False
    top_logprobs_num: integer(0, MAX_TOP_LOGPROBS) = 0
    rid: Name | None = None
    # Per prompt when a list (None: the base model).
    lora_path: str | Annotated[list[str | None], Field(max_length=MAX_PROMPTS)] | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text and input_ids")
        return self

    def to_sampling_params(self) -> SamplingParams:
        """sampling_params in SGLang's names (max_new_tokens defaults to DEFAULT_MAX_NEW_TOKENS);
        return_logprob asks for the sampled tokens' logprobs with top_logprobs_num alternatives."""
        values = self.sampling_params.model_dump(exclude_none=True) if self.sampling_params else {}
        if self.return_logprob:
            values.setdefault("logprobs", True)
            values.setdefault("top_logprobs", self.top_logprobs_num)
        return SamplingParams.from_dict(values)


class LoadLoRAAdapterRequest(_Request):
    lora_name: Name = Field(min_length=1)
    lora_path: str = Field(min_length=1, max_length=MAX_PATH_CHARS)
    pinned: Bool = False


class UnloadLoRAAdapterRequest(_Request):
    lora_name: Name = Field(min_length=1)


class TokenizeRequest(_Request):
    model: Name | None = None
    prompt: str
    add_special_tokens: Bool = True


class DetokenizeRequest(_Request):
    model: Name | None = None
    tokens: list[TokenId]

"""/v1/chat/completions end to end, through the official openai client (and raw httpx for SSE framing)."""
from __future__ import annotations

import time
import uuid

import openai
import pytest
from server_util import sse_json

PROMPT = "Tell me a short story about a cat."
GREEDY = {"temperature": 0}


def user(text: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": text}]


def greedy(client, model, messages=None, max_tokens=24, **kw):
    return client.chat.completions.create(model=model, messages=messages or user(), max_tokens=max_tokens,
                                          temperature=0, **kw)


def streamed(client, model, **kw):
    return list(client.chat.completions.create(model=model, stream=True, **kw))


def text_of(chunks, index: int = 0) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)


# ---- response shape and usage


def test_response_shape_and_usage(client, model):
    before = int(time.time())
    r = client.chat.completions.create(model=model, messages=user(), max_tokens=8)
    assert r.id.startswith("chatcmpl-") and len(r.id) > len("chatcmpl-")
    assert r.object == "chat.completion"
    assert before - 5 <= r.created <= time.time() + 5
    assert r.model == model
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 8
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    # The cache report is opt-in per request, even with --enable-cache-report.
    assert u.prompt_tokens_details is None


def test_default_max_tokens(client, model):
    """Without max_tokens the server's --default-max-tokens (16) applies."""
    r = client.chat.completions.create(model=model, messages=user(), temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16
    assert r.choices[0].finish_reason == "length"


def test_ids_are_unique(client, model):
    ids = {greedy(client, model, max_tokens=1).id for _ in range(3)}
    assert len(ids) == 3


def test_content_parts_equal_string(client, model):
    as_string = greedy(client, model, user("Hello there, how are you today?"), max_tokens=4)
    as_parts = greedy(client, model, [{"role": "user", "content": [
        {"type": "text", "text": "Hello there, "}, {"type": "text", "text": "how are you today?"}]}], max_tokens=4)
    assert as_parts.usage.prompt_tokens == as_string.usage.prompt_tokens
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content


def _tool_history(assistant_content) -> list[dict]:
    return [
        {"role": "system", "content": "You are a weather assistant."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": assistant_content, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 degrees"},
    ]


def test_tool_call_history_accepted(client, model):
    messages = _tool_history("")
    r = greedy(client, model, messages, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")
    # The history reaches the prompt: more tokens than the question alone.
    assert r.usage.prompt_tokens > greedy(client, model, messages[:2], max_tokens=1).usage.prompt_tokens


def test_tool_call_history_with_null_content_accepted(client, model):
    r = greedy(client, model, _tool_history(None), max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("n_tokens", [1, 7])
def test_max_tokens_respected(client, model, field, n_tokens):
    r = client.chat.completions.create(model=model, messages=user(), temperature=0, extra_body={"ignore_eos": True},
                                       **{field: n_tokens})
    assert r.usage.completion_tokens == n_tokens
    assert r.choices[0].finish_reason == "length"


def test_max_completion_tokens_wins_over_max_tokens(client, model):
    r = client.chat.completions.create(model=model, messages=user(), temperature=0, max_tokens=9,
                                       max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3


# ---- determinism, sampling, streaming


def test_greedy_is_deterministic(client, model):
    texts = {greedy(client, model).choices[0].message.content for _ in range(3)}
    assert len(texts) == 1


def test_stream_equals_non_stream(client, model):
    full = greedy(client, model, max_tokens=32)
    chunks = streamed(client, model, messages=user(), max_tokens=32, temperature=0)
    assert text_of(chunks) == full.choices[0].message.content
    first = chunks[0]
    assert first.object == "chat.completion.chunk"
    assert first.id.startswith("chatcmpl-") and first.model == model
    assert first.choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1, "every chunk of one completion has the same id"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices[0].finish_reason is not None, "the finish chunk comes last"
    assert all(c.usage is None for c in chunks), "no usage unless stream_options asks"


def test_stream_include_usage(client, model):
    full = greedy(client, model, max_tokens=12, extra_body={"ignore_eos": True})
    chunks = streamed(client, model, messages=user(), max_tokens=12, temperature=0,
                      stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens)
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_continuous_usage_stats(client, model):
    chunks = streamed(client, model, messages=user(), max_tokens=6, temperature=0,
                      stream_options={"include_usage": True, "continuous_usage_stats": True},
                      extra_body={"ignore_eos": True})
    assert all(c.usage is not None for c in chunks)
    completion = [c.usage.completion_tokens for c in chunks]
    assert completion == sorted(completion), "completion tokens never decrease"
    assert completion[-1] == 6
    prompt = {c.usage.prompt_tokens for c in chunks}
    assert len(prompt) == 1 and prompt.pop() > 0
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)


def test_stream_options_without_stream_rejected(http, model):
    r = http.post("/v1/chat/completions", json={"model": model, "messages": user(), "max_tokens": 1,
                                                "stream_options": {"include_usage": True}})
    assert r.status_code == 400, r.text


def test_raw_sse_framing(http, model):
    body = {"model": model, "messages": user(), "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = sse_json(raw)  # checks `data: {json}\n\n` framing and the final `data: [DONE]`
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1


def test_n_choices(client, model):
    r = client.chat.completions.create(model=model, messages=user(), n=3, max_tokens=5, temperature=1, seed=7,
                                       extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.role == "assistant" and c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 15
    assert r.usage.total_tokens == r.usage.prompt_tokens + 15


def test_n_choices_stream(client, model):
    full = client.chat.completions.create(model=model, messages=user(), n=3, max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True})
    chunks = streamed(client, model, messages=user(), n=3, max_tokens=5, temperature=0,
                      extra_body={"ignore_eos": True})
    assert all(len(c.choices) == 1 for c in chunks)
    indices = {c.choices[0].index for c in chunks}
    assert indices == {0, 1, 2}
    for i in range(3):
        mine = [c for c in chunks if c.choices[0].index == i]
        assert mine[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in mine if c.choices[0].finish_reason] == ["length"]
        assert text_of(chunks, i) == full.choices[i].message.content


def test_seed_reproducible(client, model):
    def sample(seed):
        return client.chat.completions.create(model=model, messages=user(), max_tokens=16, temperature=1, seed=seed,
                                              extra_body={"ignore_eos": True}).choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert first != sample(4321) or first != sample(99), "different seeds give different samples"


# ---- stop strings


def _stop_from(text: str) -> tuple[str, str]:
    """A stop string that really occurs in `text` (a word past the beginning) and the text before it."""
    words = text.split()
    for w in words[2:]:
        if len(w) >= 3 and w.isalpha():
            stop = " " + w
            if stop in text:
                return stop, text[:text.index(stop)]
    pytest.fail(f"no usable stop word in {text!r}")


def test_stop_string(client, model):
    text = greedy(client, model, max_tokens=32).choices[0].message.content
    stop, before = _stop_from(text)
    r = greedy(client, model, max_tokens=32, stop=[stop])
    content = r.choices[0].message.content
    assert stop not in content
    assert content == before
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 32


def test_stop_string_stream(client, model):
    text = greedy(client, model, max_tokens=32).choices[0].message.content
    stop, before = _stop_from(text)
    chunks = streamed(client, model, messages=user(), max_tokens=32, temperature=0, stop=["zzqx", stop])
    assert text_of(chunks) == before
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


# ---- logprobs


def test_logprobs(client, model):
    r = client.chat.completions.create(model=model, messages=user(), max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert e.logprob <= 0
        assert e.bytes == list(e.token.encode("utf-8"))
        assert len(e.top_logprobs) == 3
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert all(t.logprob <= 0 and t.bytes == list(t.token.encode("utf-8")) for t in e.top_logprobs)
        # Greedy: the chosen token is the most likely one.
        assert e.token == e.top_logprobs[0].token
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-4)


def test_logprobs_bytes_rebuild_multibyte_content(client, model):
    r = client.chat.completions.create(model=model, messages=user("Write three emojis about happiness: \U0001F600"),
                                       max_tokens=12, temperature=0, logprobs=True, top_logprobs=1)
    content = r.choices[0].message.content
    assert any(ord(ch) > 127 for ch in content.replace("\ufffd", "")), f"not a multi-byte output: {content!r}"
    raw = bytes(b for e in r.choices[0].logprobs.content for b in e.bytes)
    # A cut in the middle of a character ends the content with U+FFFD, as decoding the cut bytes does.
    assert raw.decode("utf-8", errors="replace") == content


def test_logprobs_off_by_default(client, model):
    assert greedy(client, model, max_tokens=2).choices[0].logprobs is None


def test_logprobs_stream(client, model):
    full = client.chat.completions.create(model=model, messages=user(), max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"ignore_eos": True})
    chunks = streamed(client, model, messages=user(), max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
                      extra_body={"ignore_eos": True})
    entries = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in entries] == [e.token for e in full.choices[0].logprobs.content]


# ---- prefix-cache report


def test_cached_tokens_reported(client, model):
    filler = " ".join(f"item{i} is {['red', 'green', 'blue'][i % 3]}." for i in range(60))
    messages = user(f"[{uuid.uuid4().hex}] Here is a list: {filler} Which item is blue?")
    ask = {"return_cached_tokens_details": True}
    first = greedy(client, model, messages, max_tokens=1, extra_body=ask)
    assert first.usage.prompt_tokens >= 250
    second = greedy(client, model, messages, max_tokens=1, extra_body=ask)
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    cached_first = first.usage.prompt_tokens_details.cached_tokens
    cached_second = second.usage.prompt_tokens_details.cached_tokens
    assert cached_second > 0
    assert cached_second > cached_first
    assert cached_second >= first.usage.prompt_tokens // 2
    # Not asked: not reported.
    third = greedy(client, model, messages, max_tokens=1)
    assert third.usage.prompt_tokens_details is None


# ---- chat template options


def _expected_prompt_tokens(tokenizer, messages, **kw) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_add_generation_prompt(client, model, tokenizer):
    messages = user("Write a haiku.")
    with_prompt = greedy(client, model, messages, max_tokens=1).usage.prompt_tokens
    without = greedy(client, model, messages, max_tokens=1,
                     extra_body={"add_generation_prompt": False}).usage.prompt_tokens
    assert with_prompt == _expected_prompt_tokens(tokenizer, messages, add_generation_prompt=True)
    assert without == _expected_prompt_tokens(tokenizer, messages, add_generation_prompt=False)
    assert without < with_prompt


def test_continue_final_message(client, model, tokenizer):
    messages = user("Write a haiku about the sea.") + [{"role": "assistant", "content": "Waves roll over"}]
    closed = greedy(client, model, messages, max_tokens=1, extra_body={"add_generation_prompt": False})
    cont = greedy(client, model, messages, max_tokens=4, extra_body={"continue_final_message": True})
    assert closed.usage.prompt_tokens == _expected_prompt_tokens(tokenizer, messages, add_generation_prompt=False)
    assert cont.usage.prompt_tokens == _expected_prompt_tokens(tokenizer, messages, add_generation_prompt=False,
                                                               continue_final_message=True)
    assert cont.usage.prompt_tokens < closed.usage.prompt_tokens, "the final message stays open"
    # With both flags the continuation wins (the two are exclusive), as vLLM does.
    both = greedy(client, model, messages, max_tokens=1,
                  extra_body={"continue_final_message": True, "add_generation_prompt": True})
    assert both.usage.prompt_tokens == cont.usage.prompt_tokens


def test_continue_final_message_needs_assistant(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        greedy(client, model, user(), max_tokens=1, extra_body={"continue_final_message": True})
    assert "assistant" in e.value.message


def test_chat_template_kwargs_accepted(client, model):
    plain = greedy(client, model, max_tokens=4)
    r = greedy(client, model, max_tokens=4, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens
    assert r.choices[0].message.content == plain.choices[0].message.content

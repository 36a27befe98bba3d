"""/v1/completions end to end: prompt shapes, echo, logprobs, n/best_of, streaming."""
from __future__ import annotations

import openai
import pytest
from server_util import assert_error, sse_json

PROMPTS = ["The capital of France is", "Once upon a time, there was a"]


def complete(client, model, prompt, max_tokens=8, **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


@pytest.fixture(scope="module")
def single(client, model):
    """Greedy completions of each prompt alone (8 tokens, ignore_eos)."""
    return [complete(client, model, p, extra_body={"ignore_eos": True}).choices[0].text for p in PROMPTS]


@pytest.fixture(scope="module")
def prompt_ids(http):
    out = []
    for p in PROMPTS:
        r = http.post("/tokenize", json={"prompt": p})
        assert r.status_code == 200, r.text
        out.append(r.json()["tokens"])
    return out


def test_string_prompt(client, model, single):
    r = complete(client, model, PROMPTS[0], extra_body={"ignore_eos": True})
    assert r.id.startswith("cmpl-")
    assert r.object == "text_completion"
    assert r.model == model
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].text == single[0] and r.choices[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_list_of_strings_index_order(client, model, single):
    r = complete(client, model, PROMPTS, n=2, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    # choice index = prompt_index * n + i: greedy, so both choices of a prompt equal its own completion.
    assert [c.text for c in r.choices] == [single[0], single[0], single[1], single[1]]
    assert r.usage.completion_tokens == 4 * 8


def test_token_id_prompt(client, model, single, prompt_ids):
    r = complete(client, model, prompt_ids[0], extra_body={"ignore_eos": True})
    assert r.choices[0].text == single[0]
    assert r.usage.prompt_tokens == len(prompt_ids[0])


def test_list_of_token_id_lists(client, model, single, prompt_ids):
    r = complete(client, model, prompt_ids, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == single
    assert r.usage.prompt_tokens == sum(map(len, prompt_ids))


def test_echo(client, model, single):
    r = complete(client, model, PROMPTS[0], echo=True, extra_body={"ignore_eos": True})
    assert r.choices[0].text == PROMPTS[0] + single[0]


def _check_logprobs(lp, text: str, top_k: int, first_generated: int = 0) -> None:
    n = len(lp.tokens)
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == text
    offsets = lp.text_offset
    assert offsets == sorted(offsets) and len(set(offsets)) == n, "text_offset strictly increases"
    for tok, off in zip(lp.tokens, offsets):
        assert text[off:off + len(tok)] == tok
    for i, (tok, lp_, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        if lp_ is None:
            continue
        assert lp_ <= 0
        assert 1 <= len(top) <= top_k  # keyed by text: two ids decoding alike share an entry
        assert all(v <= 0 for v in top.values())
        assert lp_ <= max(top.values()) + 1e-4
        if i >= first_generated:  # greedy: a generated token is the most likely one
            assert tok in top and top[tok] == pytest.approx(max(top.values()), abs=1e-4)


def test_logprobs(client, model):
    r = complete(client, model, PROMPTS[0], logprobs=2, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.completion_tokens == 8
    assert lp.text_offset[0] == 0
    assert all(v is not None for v in lp.token_logprobs)
    _check_logprobs(lp, r.choices[0].text, 2)


def test_logprobs_with_echo(client, model, prompt_ids):
    r = complete(client, model, PROMPTS[0], max_tokens=4, logprobs=2, echo=True, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    text = r.choices[0].text
    assert text.startswith(PROMPTS[0])
    assert len(lp.tokens) == len(prompt_ids[0]) + 4
    assert lp.token_logprobs[0] is None, "the first prompt token has no logprob"
    assert all(v is not None for v in lp.token_logprobs[1:])
    _check_logprobs(lp, text, 2, first_generated=len(prompt_ids[0]))


def test_n_and_best_of(client, model):
    r = client.completions.create(model=model, prompt=PROMPTS[1], n=2, best_of=2, max_tokens=4, temperature=1,
                                  seed=3, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 8
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=PROMPTS[1], n=2, best_of=1, max_tokens=4)
    assert "best_of" in e.value.message


def test_suffix_rejected(http, model):
    r = http.post("/v1/completions", json={"model": model, "prompt": PROMPTS[0], "suffix": "!", "max_tokens": 2})
    assert_error(r, 400, contains="suffix")


@pytest.mark.parametrize("prompt", [[], [[]], [1, "a"], [[1], "a"], 5])
def test_bad_prompt_shapes(http, model, prompt):
    r = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 2})
    assert_error(r, 400)


def test_stream(client, model, single):
    chunks = list(client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == single[0]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")


def test_stream_raw_framing_batch_and_usage(http, model, single):
    body = {"model": model, "prompt": PROMPTS, "max_tokens": 8, "temperature": 0, "stream": True, "echo": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        raw = "".join(r.iter_text())
    events = sse_json(raw)  # ends with data: [DONE]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 16
    texts = {0: "", 1: ""}
    for e in events[:-1]:
        (choice,) = e["choices"]
        texts[choice["index"]] += choice["text"]
    assert texts == {0: PROMPTS[0] + single[0], 1: PROMPTS[1] + single[1]}

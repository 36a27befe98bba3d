"""ReasoningParser: a leading <think>…</think> block → reasoning, the rest → content, incrementally
(pure Python, no server)."""
from __future__ import annotations

import pytest

from radixserve.server.reasoning import ReasoningParser


def run(pieces: list[str], starts_inside: bool = False) -> tuple[str, str]:
    p = ReasoningParser(starts_inside=starts_inside)
    reasoning = content = ""
    for piece in pieces:
        r, c = p.feed(piece)
        reasoning += r
        content += c
    r, c = p.finish()
    return reasoning + r, content + c


def splits(text: str) -> list[list[str]]:
    """The whole text, every split into two pieces, and char by char."""
    return [[text]] + [[text[:k], text[k:]] for k in range(len(text) + 1)] + [list(text)]


QWEN = "<think>abc</think>\n\nanswer"
DEEPSEEK = "abc</think>answer"


@pytest.mark.parametrize("pieces", splits(QWEN), ids=lambda p: "|".join(p)[:40].replace("\n", "\\n"))
def test_think_block_then_answer(pieces):
    assert run(pieces) == ("abc", "answer")


@pytest.mark.parametrize("pieces", splits(DEEPSEEK))
def test_starts_inside(pieces):
    assert run(pieces, starts_inside=True) == ("abc", "answer")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<think>\nstep 1\nstep 2\n</think>\n\nThe answer is 4.", ("\nstep 1\nstep 2\n", "The answer is 4.")),
        ("  \n<think>abc</think>answer", ("abc", "answer")),  # leading blank space before <think>
        ("<think></think>answer", ("", "answer")),
        ("<think>a < b and </thinking> is not the end</think>x", ("a < b and </thinking> is not the end", "x")),
        ("<think>abc</think>\n\n", ("abc", "")),
        ("<think>abc</think>answer with <think>inner</think> tags", ("abc", "answer with <think>inner</think> tags")),
        ("answer\n\nwith lines", ("", "answer\n\nwith lines")),
    ],
)
def test_examples(text, expected):
    for pieces in splits(text):
        assert run(pieces) == expected, pieces


@pytest.mark.parametrize("text", ["answer only", "The <think> tag later is content", "<thin", "<b>bold</b>", "",
                                  "  indented answer", "\n\n"])
def test_no_think_block_is_all_content(text):
    for pieces in splits(text):
        assert run(pieces) == ("", text), pieces


def test_content_streams_without_waiting():
    p = ReasoningParser(starts_inside=False)
    assert p.feed("Hel") == ("", "Hel")
    assert p.feed("lo") == ("", "lo")
    assert p.finish() == ("", "")


def test_possible_tag_is_held_back():
    p = ReasoningParser(starts_inside=False)
    assert p.feed("<thi") == ("", "")
    assert p.feed("nk>ab") == ("ab", "")
    assert p.feed("c</th") == ("c", "")
    assert p.feed("ink>") == ("", "")
    assert p.feed("\n\n") == ("", "")  # blank lines between </think> and the answer are neither
    assert p.feed("ans") == ("", "ans")
    assert p.finish() == ("", "")


def test_not_a_tag_after_all_is_released():
    p = ReasoningParser(starts_inside=False)
    assert p.feed("<thi") == ("", "")
    assert p.feed("s is content") == ("", "<this is content")


@pytest.mark.parametrize("text,expected", [
    ("<think>still thinking", ("still thinking", "")),
    ("<think>still thinking</thi", ("still thinking</thi", "")),
    ("<think>", ("", "")),
])
def test_unfinished_thinking_is_reasoning(text, expected):
    for pieces in splits(text):
        assert run(pieces) == expected, pieces


def test_unfinished_thinking_starts_inside():
    for pieces in splits("thinking </th"):
        assert run(pieces, starts_inside=True) == ("thinking </th", "")


def test_starts_inside_no_end_tag_is_all_reasoning():
    p = ReasoningParser(starts_inside=True)
    assert p.feed("abc") == ("abc", "")
    assert p.feed("<") == ("", "")
    assert p.finish() == ("<", "")


def test_held_back_tag_prefix_at_start_is_content_at_finish():
    p = ReasoningParser(starts_inside=False)
    assert p.feed("  <th") == ("", "")
    assert p.finish() == ("", "  <th")

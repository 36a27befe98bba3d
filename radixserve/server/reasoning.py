"""Reasoning models: <think>…</think> in the output → reasoning_content, the rest → content (incremental)."""
from __future__ import annotations

from dataclasses import dataclass

from radixserve.server.tool_calls import _partial_suffix

THINK_START, THINK_END = "<think>", "</think>"


@dataclass
class ReasoningParser:
    """starts_inside: the chat template already opened <think> (DeepSeek-R1 style), so the output
    begins inside the reasoning; otherwise reasoning is a <think> block at the very start (Qwen3)."""

    starts_inside: bool
    _buf: str = ""
    _state: str = "start"  # start → (thinking → after →) answer

    def __post_init__(self) -> None:
        if self.starts_inside:
            self._state = "thinking"

    def feed(self, text: str) -> tuple[str, str]:
        """New text → (reasoning, content)."""
        self._buf += text
        reasoning = content = ""
        if self._state == "start":
            stripped = self._buf.lstrip()
            if stripped.startswith(THINK_START):
                self._buf, self._state = stripped[len(THINK_START):], "thinking"
            elif THINK_START.startswith(stripped):
                return "", ""  # maybe the tag, still arriving
            else:
                self._state = "answer"
        if self._state == "thinking":
            i = self._buf.find(THINK_END)
            if i < 0:
                keep = _partial_suffix(self._buf, THINK_END)
                reasoning, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                return reasoning, ""
            reasoning, self._buf, self._state = self._buf[:i], self._buf[i + len(THINK_END):], "after"
        if self._state == "after":  # the blank lines between </think> and the answer are neither
            self._buf = self._buf.lstrip()
            if not self._buf:
                return reasoning, ""
            self._state = "answer"
        if self._state == "answer":
            content, self._buf = self._buf, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """Held-back text: unfinished reasoning stays reasoning; anything else is content."""
        rest, self._buf = self._buf, ""
        return (rest, "") if self._state == "thinking" else ("", rest)

"""Tool calls in the model's text (Hermes style: <tool_call>{"name": ..., "arguments": {...}}</tool_call>)
→ OpenAI's tool_calls, incrementally: content outside calls passes through, and each call streams as
OpenAI sends it (id and name first, then the arguments in pieces)."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

START, END = "<tool_call>", "</tool_call>"
# The canonical head of a call (the grammar writes exactly this; models usually do): the name is known
# before the arguments begin, so they can stream.
# The head is complete once the arguments' first character has arrived.
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class _OpenCall:
    body: str = ""  # text after <tool_call>
    call: ParsedCall | None = None  # once the head is parsed
    args_start: int = 0
    scan: int = 0  # body[args_start:scan] is streamed
    depth: int = 0
    in_string: bool = False
    escape: bool = False
    args_done: bool = False


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (held back: it may be the tag)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ToolCallParser:
    calls: list[ParsedCall] = field(default_factory=list)
    _buf: str = ""
    _open: _OpenCall | None = None

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """New text → (content outside calls, tool-call deltas)."""
        self._buf += text
        content, deltas = "", []
        while self._buf:
            if self._open is None:
                i = self._buf.find(START)
                if i < 0:
                    keep = _partial_suffix(self._buf, START)
                    content += self._buf[:len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                content += self._buf[:i]
                self._buf = self._buf[i + len(START):]
                self._open = _OpenCall()
            else:
                j = self._buf.find(END)
                chunk = self._buf if j < 0 else self._buf[:j]
                keep = _partial_suffix(chunk, END) if j < 0 else 0
                self._open.body += chunk[:len(chunk) - keep]
                self._buf = chunk[len(chunk) - keep:] if j < 0 else self._buf[j + len(END):]
                deltas += self._advance(self._open)
                if j < 0:
                    break
                deltas += self._close(self._open, content_sink := [])
                content += "".join(content_sink)
                self._open = None
        return content, deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The end of the output: held-back text is content, or the rest of a call cut short."""
        rest, self._buf, oc, self._open = self._buf, "", self._open, None
        if oc is None:
            return rest, []
        if oc.call is None:
            return START + oc.body + rest, []
        oc.body += rest  # what looked like the start of </tool_call> belongs to the cut arguments
        return "", self._advance(oc)

    # ---- one call
    def _advance(self, oc: _OpenCall) -> list[ToolCallDelta]:
        deltas = []
        if oc.call is None:
            m = _HEAD.match(oc.body)
            if m is None:
                return deltas
            name = json.loads(f'"{m.group(1)}"')
            oc.call = ParsedCall(f"call_{uuid.uuid4().hex[:24]}", name)
            oc.args_start = oc.scan = m.end()
            self.calls.append(oc.call)
            deltas.append(ToolCallDelta(len(self.calls) - 1, oc.call.id, name))
        if not oc.args_done:
            end = self._scan_value(oc)
            piece = oc.body[oc.scan:end]
            oc.scan = end
            if piece:
                oc.call.arguments += piece
                deltas.append(ToolCallDelta(len(self.calls) - 1, arguments=piece))
        return deltas

    @staticmethod
    def _scan_value(oc: _OpenCall) -> int:
        """Scan the arguments' JSON value from oc.scan; where it ends, or how far the text goes."""
        body, i = oc.body, oc.scan
        while i < len(body):
            ch = body[i]
            if oc.in_string:
                if oc.escape:
                    oc.escape = False
                elif ch == "\\":
                    oc.escape = True
                elif ch == '"':
                    oc.in_string = False
                    if oc.depth == 0:  # the arguments were a bare string
                        oc.args_done = True
                        return i + 1
            elif oc.depth == 0 and i > oc.args_start and ch in ",}] \t\r\n":
                oc.args_done = True  # the end of a bare number or literal
                return i
            elif ch == '"':
                oc.in_string = True
            elif ch in "{[":
                oc.depth += 1
            elif ch in "}]":
                oc.depth -= 1
                if oc.depth == 0:
                    oc.args_done = True
                    return i + 1
            i += 1
        return i

    def _close(self, oc: _OpenCall, content: list[str]) -> list[ToolCallDelta]:
        """</tool_call> arrived: a call whose head did not parse is parsed whole, or kept as text."""
        if oc.call is not None:
            return []
        try:
            obj = json.loads(oc.body)
            name = obj["name"]
            args = obj.get("arguments", obj.get("parameters", {}))
            if not isinstance(name, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            content.append(START + oc.body + END)  # not a call after all: keep the text as it was
            return []
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        call = ParsedCall(f"call_{uuid.uuid4().hex[:24]}", name, args)
        self.calls.append(call)
        return [ToolCallDelta(len(self.calls) - 1, call.id, name, args)]

"""Incremental, UTF-8-safe detokenization of one generated sequence with stop-string matching."""

from __future__ import annotations

# Prompt tokens kept as left context: enough for the first generated token to merge/space correctly.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's generated tokens into final text pieces; see add() and flush()."""

    def __init__(self, tokenizer, prompt_ids: list[int], *, skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True, stop: list[str] = ()):
        self._tok = tokenizer
        self._decode_kwargs = dict(skip_special_tokens=skip_special_tokens,
                                   spaces_between_special_tokens=spaces_between_special_tokens)
        self._stops = [s for s in dict.fromkeys(stop) if s]
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:]) if _CONTEXT_TOKENS else []
        # Text of ids[prefix:] minus text of ids[prefix:read] is the text contributed by ids[read:].
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        # Characters of the current window's delta already moved to _pending (the part before an
        # incomplete trailing character is final, so stops inside it are seen on the right token).
        self._window_pos = 0
        self._pending = ""  # decoded but not yet returned (may still start a stop string)
        self._pieces: list[str] = []
        self.finished = False
        self.matched_stop: str | None = None
        self.num_tokens = 0

    @property
    def text(self) -> str:
        # Joined lazily: repeated str += on an attribute would copy the whole text every call.
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, **self._decode_kwargs)

    def _emit(self, s: str) -> str:
        if s:
            self._pieces.append(s)
        return s

    def _step(self, final: bool) -> None:
        """Move the newly decodable text of the window into _pending."""
        delta = self._decode(self._ids[self._prefix:])[len(self._prefix_text):]
        complete = final or not delta.endswith(_REPLACEMENT)
        stable = delta if complete else delta.rstrip(_REPLACEMENT)
        if len(stable) > self._window_pos:
            self._pending += stable[self._window_pos:]
            self._window_pos = len(stable)
        # Advance only on non-empty text: a window made only of skipped special tokens would lose
        # the leading-space context that sentencepiece-style decoders need.
        if complete and delta:
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix:self._read])
            self._window_pos = 0

    def _match_stop(self) -> bool:
        """Cut _pending before the earliest stop occurrence, if any."""
        best = None
        for s in self._stops:
            i = self._pending.find(s)
            if i >= 0 and (best is None or (i, len(s)) < (best[0], len(best[1]))):
                best = (i, s)
        if best is None:
            return False
        self._pending = self._pending[:best[0]]
        self.finished, self.matched_stop = True, best[1]
        return True

    def _held_len(self) -> int:
        """Length of the longest suffix of _pending that is a proper prefix of some stop string."""
        for n in range(min(len(self._pending), self._max_stop - 1), 0, -1):
            tail = self._pending[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0

    def add(self, token_ids: list[int]) -> str:
        """Feed new tokens; return the text that became final (cut before a stop once one appears)."""
        if self.finished:
            return ""
        out = []
        # One token at a time so num_tokens points at the exact token that completed a stop.
        for tid in token_ids:
            self._ids.append(tid)
            self.num_tokens += 1
            self._step(final=False)
            if self._match_stop():
                out.append(self._pending)
                self._pending = ""
                break
        if not self.finished:
            keep = self._held_len()
            out.append(self._pending[:len(self._pending) - keep])
            self._pending = self._pending[len(self._pending) - keep:]
        return self._emit("".join(out))

    def flush(self) -> str:
        """The sequence ended without a stop: return everything still held back."""
        if self.finished:
            return ""
        # final=True releases a trailing U+FFFD too; _window_pos makes a second flush return ''.
        self._step(final=True)
        out, self._pending = self._pending, ""
        return self._emit(out)

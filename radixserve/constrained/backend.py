"""The engine's grammar backend: compiles constraints on a worker thread (so other requests keep
decoding), caches them by spec, and fills the token bitmasks of a step's constrained rows at once."""
from __future__ import annotations

import json
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import xgrammar as xgr

from radixserve.constrained.grammar import build_grammar

_MAX_CACHED = 512  # distinct specs kept compiled


class GrammarBackend:
    def __init__(self, vocab: list[str], metadata: str, vocab_size: int, stop_token_ids: list[int],
                 max_rows: int) -> None:
        """vocab, metadata: from constrained.grammar.tokenizer_vocab; vocab_size: the model's logit
        width (it may pad the tokenizer's vocabulary); stop_token_ids: what ends a complete output."""
        meta = json.loads(metadata)
        meta["vocab_size"] = vocab_size
        tokens = (list(vocab) + [""] * vocab_size)[:vocab_size]
        info = xgr.TokenizerInfo.from_vocab_and_metadata(tokens, json.dumps(meta))
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="radixserve-grammar")
        # Bitmasks are filled on their own thread, during the forward pass (compilations may be long).
        self._mask_executor = ThreadPoolExecutor(1, thread_name_prefix="radixserve-bitmask")
        self._compiled: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._stop_token_ids = sorted(stop_token_ids)
        self._bitmask = xgr.allocate_token_bitmask(max_rows, vocab_size)
        self._filler = xgr.BatchGrammarMatcher(max_threads=1)

    def compile(self, kind: str, spec: str) -> Future:
        """A future of the compiled grammar; identical specs share one compilation."""
        key = (kind, spec)
        fut = self._compiled.get(key)
        if fut is None:
            fut = self._executor.submit(lambda: self._compiler.compile_grammar(build_grammar(kind, spec)))
            self._compiled[key] = fut
            if len(self._compiled) > _MAX_CACHED:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(key)
        return fut

    def matcher(self, compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
        # The engine's stop tokens (not the tokenizer's guess) are the ones that end a complete output.
        return xgr.GrammarMatcher(compiled, override_stop_tokens=self._stop_token_ids)

    def bitmask(self, matchers: list[xgr.GrammarMatcher | None]) -> torch.Tensor:
        """Packed allowed-token bitmask [len(matchers), W]: the matcher's next tokens, or all for None."""
        mask = self._bitmask[:len(matchers)]
        mask.fill_(-1)
        rows = [i for i, m in enumerate(matchers) if m is not None]
        self._filler.batch_fill_next_token_bitmask([matchers[i] for i in rows], mask, rows)
        return mask

    def bitmask_async(self, matchers: list[xgr.GrammarMatcher | None]) -> Future:
        """bitmask() on the bitmask thread, to overlap with the step's forward pass. The matchers must not
        advance, nor another bitmask be asked for, until the result is taken."""
        return self._mask_executor.submit(self.bitmask, matchers)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._mask_executor.shutdown(wait=False, cancel_futures=True)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Disallowed tokens' logits to -inf, in place (xgrammar's kernel for the device)."""
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True))

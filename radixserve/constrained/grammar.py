"""Output constraints → xgrammar grammars: one function for every kind, used to check a request's spec
in the API process (a clear 400) and to compile it in the engine."""
from __future__ import annotations

import functools
import json
import logging
import re

import xgrammar as xgr

from radixserve.constrained.schema import check_schema

logger = logging.getLogger(__name__)

# "[12:00:00] /project/cpp/regex_converter.cc:83: " before xgrammar's own message
_CPP_LOCATION = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")


def _json_schema_grammar(spec: str) -> xgr.Grammar:
    try:
        schema = json.loads(spec)
    except json.JSONDecodeError as e:
        raise ValueError(f"json_schema is not valid JSON: {e}") from None
    check_schema(schema)
    # Compact separators (", ", ": ") instead of free whitespace: a small model given free whitespace
    # can spend its whole budget on newlines. strict_mode: no properties beyond the schema's.
    return xgr.Grammar.from_json_schema(spec, any_whitespace=False, strict_mode=True)


_BUILDERS = {
    "json_schema": _json_schema_grammar,
    "regex": xgr.Grammar.from_regex,
    "ebnf": xgr.Grammar.from_ebnf,
    "structural_tag": xgr.Grammar.from_structural_tag,
}


@functools.lru_cache(maxsize=256)
def build_grammar(kind: str, spec: str) -> xgr.Grammar:
    """The grammar of one constraint; ValueError (for a 400) when the spec is invalid or unsupported."""
    try:
        return _BUILDERS[kind](spec)
    except ValueError:
        raise
    except Exception as e:  # xgrammar reports parse errors as RuntimeError with a C++ location prefix
        detail = _CPP_LOCATION.sub("", str(e).strip()) or type(e).__name__
        raise ValueError(f"invalid {kind}: {detail}") from None


def check_constraint(params) -> None:
    """Raise ValueError if the request's output constraint (SamplingParams.grammar) cannot be enforced."""
    if params.grammar is not None:
        build_grammar(*params.grammar)


def tokenizer_vocab(tokenizer) -> tuple[list[str], str]:
    """The tokenizer as the engine's grammar backend needs it: tokens by id and xgrammar's metadata
    (vocabulary type, prefix-space handling). Cheap to send to the engine process."""
    vocab = tokenizer.get_vocab()
    tokens = [""] * (max(vocab.values()) + 1)
    for token, idx in vocab.items():
        tokens[idx] = token
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokens))
    return tokens, info.dump_metadata()

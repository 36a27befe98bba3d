"""From token states to one vector per text, as an embedding model's folder says (sentence-transformers'
modules.json, 1_Pooling/config.json, sentence_bert_config.json): pooling, vectorised over a whole step
(segment sums with index_add, no loop over texts), then normalisation and Matryoshka truncation."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers' older boolean keys, in the order it concatenates them.
_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_MODULE_KINDS = ("Transformer", "Pooling", "Normalize")


@dataclass
class EmbeddingSpec:
    """How a model's token states become its embedding."""

    pooling: tuple[str, ...]  # concatenated in this order
    normalize: bool  # L2-normalised output (a Normalize module)
    max_length: int | None = None  # sentence-transformers' max_seq_length
    do_lower_case: bool = False  # texts are lower-cased before tokenization
    matryoshka_dimensions: list[int] | None = None  # sizes the model was trained to be truncated to
    source: str = "default"  # "sentence-transformers" when read from modules.json


def has_sentence_transformers_config(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "modules.json"))


def _read_json(path: str) -> dict | list:
    with open(path) as f:
        return json.load(f)


def _pooling_modes(cfg: dict) -> tuple[str, ...]:
    modes = cfg.get("pooling_mode")
    if modes is None:
        modes = tuple(mode for key, mode in _LEGACY_KEYS.items() if cfg.get(key))
    elif isinstance(modes, str):
        modes = (modes,)
    modes = tuple(modes) or ("mean",)  # sentence-transformers' default
    for mode in modes:
        if mode not in POOLING_MODES:
            raise ValueError(f"unsupported pooling mode {mode!r} (supported: {', '.join(POOLING_MODES)})")
    return modes


def _transformer_limits(folder: str) -> tuple[int | None, bool]:
    """The Transformer module's input limit and lower-casing: sentence_bert_config.json's max_seq_length
    (older saves), else the tokenizer's model_max_length (where newer sentence-transformers keep it)."""
    st, tok = {}, {}
    if os.path.isfile(os.path.join(folder, "sentence_bert_config.json")):
        st = _read_json(os.path.join(folder, "sentence_bert_config.json"))
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        tok = _read_json(os.path.join(folder, "tokenizer_config.json"))
    limit = st.get("max_seq_length")
    if limit is None and isinstance(tok.get("model_max_length"), int) and tok["model_max_length"] < 1_000_000:
        limit = tok["model_max_length"]  # transformers writes ~1e30 for "no limit"
    return limit, bool(st.get("do_lower_case", False))


def read_embedding_spec(path: str, default_pooling: str) -> EmbeddingSpec:
    """The folder's sentence-transformers pipeline (Transformer → Pooling → optional Normalize), or, for
    a folder without one, `default_pooling` and normalised output (the convention of serving engines).
    Other modules (Dense, ...) are refused rather than silently skipped."""
    hf_cfg = {}
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        hf_cfg = _read_json(os.path.join(path, "config.json"))
    matryoshka = hf_cfg.get("matryoshka_dimensions")
    matryoshka = sorted(int(d) for d in matryoshka) if matryoshka else None
    if not has_sentence_transformers_config(path):
        return EmbeddingSpec((default_pooling,), True, matryoshka_dimensions=matryoshka)
    spec = EmbeddingSpec(("mean",), False, matryoshka_dimensions=matryoshka, source="sentence-transformers")
    for module in sorted(_read_json(os.path.join(path, "modules.json")), key=lambda m: m.get("idx", 0)):
        kind = module["type"].rsplit(".", 1)[-1]
        folder = os.path.join(path, module.get("path", ""))
        if kind not in _MODULE_KINDS:
            raise ValueError(f"unsupported sentence-transformers module {module['type']!r} in modules.json "
                             f"(supported: {', '.join(_MODULE_KINDS)})")
        if kind == "Transformer":
            spec.max_length, spec.do_lower_case = _transformer_limits(folder)
        elif kind == "Pooling":
            spec.pooling = _pooling_modes(_read_json(os.path.join(folder, "config.json")))
        else:
            spec.normalize = True
    return spec


def embedding_info(spec: EmbeddingSpec, dim: int, matryoshka: list[int] | None) -> dict:
    """The model facts the API process needs to validate and tokenize embedding requests."""
    return {"embedding_dim": dim, "pooling": "+".join(spec.pooling), "normalized": spec.normalize,
            "matryoshka_dimensions": matryoshka, "do_lower_case": spec.do_lower_case}


def check_matryoshka(dims: list[int] | None, size: int) -> list[int] | None:
    """The operator's or the config's Matryoshka sizes, which must fit the embedding."""
    if dims and max(dims) > size:
        raise ValueError(f"matryoshka dimensions {dims} exceed the embedding size {size}")
    return dims


def pool(hidden: torch.Tensor, modes: tuple[str, ...], seq_ids: torch.Tensor, starts: torch.Tensor,
         lens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pool packed token states hidden [T, H] (texts back to back: seq_ids/positions [T], starts/lens [B])
    into [B, H * len(modes)] float32, accumulating in float32."""
    b, h = lens.shape[0], hidden.shape[1]
    x = hidden.float()
    lens_f = lens.to(torch.float32)[:, None]
    out: list[torch.Tensor] = []
    sums: torch.Tensor | None = None
    for mode in modes:  # at most a few, fixed by the model
        if mode == "cls":
            out.append(x[starts])
        elif mode == "lasttoken":
            out.append(x[starts + lens - 1])
        elif mode == "max":
            index = seq_ids[:, None].expand(-1, h)
            out.append(torch.zeros(b, h, device=x.device).scatter_reduce_(0, index, x, "amax", include_self=False))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            if sums is None:
                sums = torch.zeros(b, h, device=x.device).index_add_(0, seq_ids, x)
            out.append(sums / (lens_f if mode == "mean" else lens_f.sqrt()))
        else:  # weightedmean: token i of a text weighs i + 1
            w = (positions + 1).to(torch.float32)
            weighted = torch.zeros(b, h, device=x.device).index_add_(0, seq_ids, x * w[:, None])
            out.append(weighted / (lens_f * (lens_f + 1) / 2))
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


def finish(vectors: torch.Tensor, normalize: bool, dimensions: list[int | None]) -> list[bytes]:
    """Each text's embedding as little-endian float32 bytes: normalised if the model's are, truncated to
    the request's `dimensions` (and then normalised again, so a truncated embedding is a unit vector too)."""
    v = vectors.float()
    if normalize:
        v = F.normalize(v, dim=-1)
    size = v.shape[1]
    if normalize and any(d is not None and d < size for d in dimensions):
        keep = torch.tensor([size if d is None else d for d in dimensions], device=v.device)
        v = F.normalize(v * (torch.arange(size, device=v.device)[None, :] < keep[:, None]), dim=-1)
    rows = np.ascontiguousarray(v.cpu().numpy(), dtype="<f4")
    return [rows[i, :d].tobytes() for i, d in enumerate(dimensions)]

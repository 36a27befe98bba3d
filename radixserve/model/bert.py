"""BERT-family encoder for embeddings: bidirectional attention, absolute position and token-type
embeddings, GELU feed-forward, post-LayerNorm residual blocks.

The encoder runs over a step's texts packed into one token stream [T]: every linear and norm sees only
real tokens; attention alone is laid out padded [B, Lmax] with a key-padding mask (one SDPA call for the
whole step). Pooling of the packed hidden states is in `pooling.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from radixserve.model.weights import Target, load_checkpoint

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class BertConfig:
    """Shape of a BERT encoder, read from an HF config.json."""

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_hf(cls, cfg: dict) -> "BertConfig":
        if cfg.get("model_type") != "bert":
            raise ValueError(f"not a BERT config (model_type {cfg.get('model_type')!r})")
        act = cfg.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {act!r} (supported: {', '.join(_ACTIVATIONS)})")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"unsupported position_embedding_type {cfg['position_embedding_type']!r} "
                             f"(supported: absolute)")
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return cls(
            architecture=(cfg.get("architectures") or ["BertModel"])[0],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 512),
            type_vocab_size=cfg.get("type_vocab_size", 2),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
            hidden_act=act,
        )


@dataclass
class EncoderInput:
    """A step's texts packed back to back: input_ids/positions [T]; attention's padded layout."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] position of each token in its text
    seq_ids: torch.Tensor  # [T] which text each token belongs to
    lens: torch.Tensor  # [B]
    starts: torch.Tensor  # [B] where each text starts in the stream
    pad_index: torch.Tensor  # [B, Lmax] stream index of each padded position (padding → 0)
    valid: torch.Tensor  # [B, Lmax] real (non-padding) positions
    key_mask: torch.Tensor | None  # [B, 1, 1, Lmax] keys a query may attend; None when nothing is padded

    @classmethod
    def pack(cls, texts: list[list[int]], device: torch.device) -> "EncoderInput":
        lens_list = [len(t) for t in texts]
        lens = torch.tensor(lens_list, dtype=torch.int64)
        starts = torch.cumsum(lens, 0) - lens
        total, max_len = int(lens.sum()), max(lens_list)
        seq_ids = torch.repeat_interleave(torch.arange(len(texts)), lens)
        positions = torch.arange(total) - starts.repeat_interleave(lens)
        ar = torch.arange(max_len)
        valid = ar[None, :] < lens[:, None]
        pad_index = torch.where(valid, starts[:, None] + ar[None, :], 0)
        ragged = min(lens_list) != max_len
        ids = torch.tensor([tok for t in texts for tok in t], dtype=torch.int64)
        to = (lambda t: t.to(device)) if device.type != "cpu" else (lambda t: t)
        return cls(input_ids=to(ids), positions=to(positions), seq_ids=to(seq_ids), lens=to(lens),
                   starts=to(starts), pad_index=to(pad_index), valid=to(valid),
                   key_mask=to(valid[:, None, None, :]) if ragged else None)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, h // cfg.num_heads
        self.qkv = nn.Linear(h, 3 * h)  # query/key/value fused: one matmul instead of three
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.up = nn.Linear(h, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, h)
        self.out_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, inp: EncoderInput) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv(x).view(t, 3, self.num_heads, self.head_dim).unbind(1)
        attn = _padded_attention(q, k, v, inp)
        x = self.attn_norm(x + self.attn_out(attn.reshape(t, -1)))
        return self.out_norm(x + self.down(self.act(self.up(x))))


def _padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inp: EncoderInput) -> torch.Tensor:
    """Bidirectional attention within each text. q/k/v: [T, H, D] → [T, H, D].

    The packed stream is gathered into [B, H, Lmax, D] (padding keys masked out) so that one SDPA call
    covers the step; a block-diagonal mask over the whole stream would cost O(T^2) instead of
    O(B * Lmax^2).
    """
    if inp.pad_index.shape[0] == 1:  # one text: no padding, no mask
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None])
        return o[0].transpose(0, 1)
    qp, kp, vp = (x[inp.pad_index].transpose(1, 2) for x in (q, k, v))
    o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=inp.key_mask)
    return o.transpose(1, 2)[inp.valid]


class BertModel(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, h)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, h)
        self.embed_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, inp: EncoderInput) -> torch.Tensor:
        """Last hidden states of every token of the stream, [T, hidden]. Every text is one segment of
        token type 0 (single-text embeddings)."""
        x = self.word_embeddings(inp.input_ids) + self.position_embeddings(inp.positions)
        x = self.embed_norm(x + self.token_type_embeddings.weight[0])
        for layer in self.layers:
            x = layer(x, inp)
        return x

    # HF names (after the optional "bert." prefix) → ours; q/k/v are fused into qkv.
    _RENAMES = {
        "embeddings.word_embeddings": "word_embeddings",
        "embeddings.position_embeddings": "position_embeddings",
        "embeddings.token_type_embeddings": "token_type_embeddings",
        "embeddings.LayerNorm": "embed_norm",
    }
    _LAYER_RENAMES = {
        "attention.output.dense": "attn_out",
        "attention.output.LayerNorm": "attn_norm",
        "intermediate.dense": "up",
        "output.dense": "down",
        "output.LayerNorm": "out_norm",
    }
    _QKV = {"attention.self.query": 0, "attention.self.key": 1, "attention.self.value": 2}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named weights in (a bare BertModel or one under a "bert." prefix); heads that are
        not part of the encoder (pooler, masked-LM) are skipped. Every parameter must be covered."""
        load_checkpoint(self, weights, self._rename)

    def _rename(self, name: str) -> Target:
        name = name.removeprefix("bert.")
        if name.startswith(("pooler.", "cls.")) or name == "embeddings.position_ids":
            return None
        module, _, kind = name.rpartition(".")
        kind = {"gamma": "weight", "beta": "bias"}.get(kind, kind)  # TF-era LayerNorm names
        if module in self._RENAMES:
            return f"{self._RENAMES[module]}.{kind}"
        if module.startswith("encoder.layer."):
            _, _, index, sub = module.split(".", 3)
            if sub in self._QKV:
                return f"layers.{index}.qkv.{kind}", self._QKV[sub], 3
            if sub in self._LAYER_RENAMES:
                return f"layers.{index}.{self._LAYER_RENAMES[sub]}.{kind}"
        return name

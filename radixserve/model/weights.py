"""Copying a checkpoint's tensors into a model's parameters, fusing the pieces of fused projections."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, TypeVar

import torch
from torch import nn

# What a model makes of a checkpoint name: None (skip it), its parameter's name, or
# (fused parameter name, piece index, number of pieces) for e.g. q/k/v concatenated into one qkv weight.
Target = str | tuple[str, int, int] | None
T = TypeVar("T")


def fused(weights: Iterable[tuple[str, T]], rename: Callable[[str], Target], strict: bool = True,
          concat: Callable[[list[T]], T] = torch.cat) -> Iterator[tuple[str, str, T]]:
    """(checkpoint name, parameter name, value) with the pieces of a fused parameter joined by concat
    (tensors: concatenated along the output dimension). A fused parameter some of whose pieces never
    come is a ValueError when strict, else left out."""
    pending: dict[str, dict[int, T]] = {}
    for source, value in weights:
        target = rename(source)
        if target is None:
            continue
        if isinstance(target, tuple):
            name, piece, count = target
            group = pending.setdefault(name, {})
            group[piece] = value
            if len(group) < count:
                continue
            parts = [group[i] for i in range(count)]
            del pending[name]
            yield source, name, concat(parts)
        else:
            yield source, target, value
    if pending and strict:
        raise ValueError(f"checkpoint is missing weights: {sorted(pending)[:5]}")


@torch.no_grad()
def load_checkpoint(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                    rename: Callable[[str], Target]) -> None:
    """Copy every (name, tensor) into module's parameter rename(name); shapes must match and every
    parameter must be covered (ValueError naming the weight otherwise)."""
    params = dict(module.named_parameters())
    loaded: set[str] = set()
    for source, name, tensor in fused(weights, rename):
        if name not in params:
            raise ValueError(f"unexpected weight {source!r} in checkpoint")
        if params[name].shape != tensor.shape:
            raise ValueError(f"weight {name}: shape {tuple(tensor.shape)} != expected {tuple(params[name].shape)}")
        params[name].copy_(tensor)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing weights: {missing[:5]}")

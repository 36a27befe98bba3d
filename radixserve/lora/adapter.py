"""PEFT LoRA adapter folders → weights laid out for the stacked buffers, validated against the base model.

Anything the batched path cannot apply exactly (DoRA, modules_to_save, embedding or lm_head targets, a
rank above --max-lora-rank, shapes of another base model...) is refused at load time with an error
naming it, never applied approximately.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch

from radixserve.lora.refs import TARGET_MODULES

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (an adapter name may sit before .weight)
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\."
                  r"lora_([AB])(?:\.[\w-]+)?\.weight$")


class LoRAError(ValueError):
    """An adapter that cannot be loaded: missing files, an unsupported feature, another base model."""


@dataclass(frozen=True)
class LinearLayout:
    """Where each targeted projection of one (fused) linear sits: the buffer's pieces, in order."""

    in_features: int
    out_features: int
    pieces: tuple[tuple[str, int, int], ...]  # (target, first output column, width)


def model_layout(projections: dict[str, tuple[int, tuple[tuple[str, int], ...]]],
                 targets: tuple[str, ...]) -> dict[str, LinearLayout]:
    """The linears that get LoRA buffers (those computing at least one target) and their pieces.

    projections: the model's (possibly fused) linears that adapters may target, by their name in a
    decoder layer: {name: (in_features, ((projection, output width), ...) in output order)}, as the model
    describes them (model.llama.lora_projections)."""
    layout = {}
    for name, (in_features, outs) in projections.items():
        pieces, offset = [], 0
        for target, width in outs:
            if target in targets:
                pieces.append((target, offset, width))
            offset += width
        if pieces:
            layout[name] = LinearLayout(in_features, offset, tuple(pieces))
    return layout


def read_adapter_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise LoRAError(f"LoRA adapter path {path!r} is not a directory (a PEFT adapter folder is expected)")
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise LoRAError(f"LoRA adapter {path!r} has no {CONFIG_FILE} (a PEFT adapter folder is expected)")
    try:
        with open(file) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LoRAError(f"LoRA adapter {path!r}: cannot read {CONFIG_FILE}: {e}") from None
    if not isinstance(cfg, dict):
        raise LoRAError(f"LoRA adapter {path!r}: {CONFIG_FILE} is not a JSON object")
    _check_features(path, cfg)
    return cfg


def _check_features(path: str, cfg: dict) -> None:
    """Refuse the PEFT options whose effect the batched LoRA path does not reproduce."""
    kind = cfg.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise LoRAError(f"LoRA adapter {path!r}: peft_type {kind!r} is not supported (only LORA)")
    unsupported = {
        "use_dora": "DoRA (use_dora)",
        "modules_to_save": "modules_to_save (fully trained copies of base modules)",
        "rank_pattern": "per-module ranks (rank_pattern)",
        "alpha_pattern": "per-module alphas (alpha_pattern)",
        "fan_in_fan_out": "fan_in_fan_out (transposed Conv1D weights)",
        "lora_bias": "LoRA biases (lora_bias)",
        "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
        "target_parameters": "parameter targets (target_parameters)",
        "use_qalora": "QALoRA (use_qalora)",
        "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
        "arrow_config": "Arrow routing (arrow_config)",
        "layer_replication": "layer replication (layer_replication)",
        "use_bdlora": "block-diagonal LoRA (use_bdlora)",
        "kasa_config": "KaSA (kasa_config)",
        "monteclora_config": "MonteCLoRA (monteclora_config)",
    }
    for key, what in unsupported.items():
        if cfg.get(key):
            raise LoRAError(f"LoRA adapter {path!r} uses {what}, which is not supported")
    if cfg.get("bias", "none") != "none":
        raise LoRAError(f"LoRA adapter {path!r} trains biases (bias={cfg['bias']!r}), which is not supported")
    r = cfg.get("r")
    if not isinstance(r, int) or r < 1:
        raise LoRAError(f"LoRA adapter {path!r}: {CONFIG_FILE} has no valid rank r (got {r!r})")


def config_targets(path: str, cfg: dict) -> tuple[str, ...]:
    """The projections an adapter config names (a list, or PEFT's regex string / "all-linear")."""
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        if targets == "all-linear":
            return TARGET_MODULES
        pattern = re.compile(targets)
        found = tuple(t for t in TARGET_MODULES if any(
            pattern.fullmatch(f"model.layers.0.{grp}.{t}") for grp in ("self_attn", "mlp")))
        if not found:
            raise LoRAError(f"LoRA adapter {path!r}: target_modules {targets!r} matches no supported projection")
        return found
    if not isinstance(targets, list) or not targets:
        raise LoRAError(f"LoRA adapter {path!r}: {CONFIG_FILE} has no target_modules")
    names = {t.rsplit(".", 1)[-1] for t in targets}
    unknown = sorted(names - set(TARGET_MODULES))
    if unknown:
        raise LoRAError(f"LoRA adapter {path!r} targets {', '.join(unknown)}, which is not supported "
                        f"(supported: {', '.join(TARGET_MODULES)})")
    return tuple(t for t in TARGET_MODULES if t in names)


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(file)
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a corrupt file, whatever the reader raises
            raise LoRAError(f"LoRA adapter {path!r}: cannot read {name}: {e}") from None
    raise LoRAError(f"LoRA adapter {path!r} has no weights ({' or '.join(WEIGHT_FILES)})")


def _unsupported_key(path: str, key: str) -> LoRAError:
    if "lora_magnitude_vector" in key:
        what = "DoRA (lora_magnitude_vector)"
    elif "lora_embedding" in key or "embed_tokens" in key:
        what = "an embedding target (embed_tokens)"
    elif "lm_head" in key:
        what = "an lm_head target"
    elif "modules_to_save" in key or "original_module" in key:
        what = "modules_to_save (fully trained copies of base modules)"
    elif key.endswith(".bias"):
        what = "LoRA biases"
    else:
        what = f"the weight {key!r}"
    return LoRAError(f"LoRA adapter {path!r} has {what}, which is not supported")


@dataclass
class LoRAAdapter:
    """An adapter's weights in buffer layout, scaling folded in: per (layer, linear), A [r * pieces, in]
    and B [r * pieces, out] with rows rank-major (see lora.ops.add_lora); missing pieces are zeros."""

    path: str
    rank: int
    scaling: float
    targets: tuple[str, ...]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def linear_of(layout: dict[str, LinearLayout]) -> dict[str, str]:
    """projection (q_proj, ...) → the name of the linear computing it, for the layout's targets."""
    return {target: name for name, lin in layout.items() for target, _, _ in lin.pieces}


def load_adapter(path: str, num_layers: int, layout: dict[str, LinearLayout], max_rank: int,
                 dtype: torch.dtype) -> LoRAAdapter:
    """Read and validate a PEFT adapter folder for this base model (num_layers decoder layers) and these
    buffers."""
    acfg = read_adapter_config(path)
    rank = acfg["r"]
    if rank > max_rank:
        raise LoRAError(f"LoRA adapter {path!r} has rank {rank}, above --max-lora-rank {max_rank} (by default "
                        f"the largest rank among --lora-paths)")
    alpha = acfg.get("lora_alpha", rank)
    scaling = alpha / math.sqrt(rank) if acfg.get("use_rslora") else alpha / rank
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in _read_weights(path).items():
        m = _KEY.match(key)
        if m is None:
            raise _unsupported_key(path, key)
        layer, target, which = int(m.group(1)), m.group(2), m.group(3)
        if target not in TARGET_MODULES:
            raise LoRAError(f"LoRA adapter {path!r} targets {target}, which is not supported "
                            f"(supported: {', '.join(TARGET_MODULES)})")
        if layer >= num_layers:
            raise LoRAError(f"LoRA adapter {path!r} has weights for layer {layer}, but the base model has "
                            f"{num_layers} layers (an adapter for another base model?)")
        pairs.setdefault((layer, target), {})[which] = tensor
    if not pairs:
        raise LoRAError(f"LoRA adapter {path!r} has no LoRA weights")
    targets = sorted({t for _, t in pairs}, key=TARGET_MODULES.index)
    owner = linear_of(layout)
    allowed = set(owner)
    outside = [t for t in targets if t not in allowed]
    if outside:
        raise LoRAError(f"LoRA adapter {path!r} targets {', '.join(outside)}, outside --lora-target-modules "
                        f"({', '.join(t for t in TARGET_MODULES if t in allowed)}; by default the modules that "
                        f"--lora-paths adapters target)")
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, target), ab in sorted(pairs.items(), key=lambda kv: (kv[0][0], TARGET_MODULES.index(kv[0][1]))):
        where = f"layer {layer} {target}"
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"LoRA adapter {path!r}: {where} has lora_{'A' if 'A' in ab else 'B'} without "
                            f"lora_{'B' if 'A' in ab else 'A'}")
        lin_name = owner[target]
        lin = layout[lin_name]
        p, (_, col, width) = next((i, pc) for i, pc in enumerate(lin.pieces) if pc[0] == target)
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise LoRAError(f"LoRA adapter {path!r}: {where} has lora_A {tuple(a.shape)} / lora_B "
                            f"{tuple(b.shape)}, not rank r={rank} as {CONFIG_FILE} says")
        if a.shape[1] != lin.in_features or b.shape[0] != width:
            raise LoRAError(f"LoRA adapter {path!r}: {where} maps {a.shape[1]} → {b.shape[0]} features, but the "
                            f"base model's {target} maps {lin.in_features} → {width} (an adapter for another "
                            f"base model?)")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise LoRAError(f"LoRA adapter {path!r}: {where} has non-finite weights")
        entry = weights.get((layer, lin_name))
        n = len(lin.pieces)
        if entry is None:
            entry = (torch.zeros(rank * n, lin.in_features, dtype=dtype),
                     torch.zeros(rank * n, lin.out_features, dtype=dtype))
            weights[(layer, lin_name)] = entry
        entry[0][p::n] = a.to(dtype)  # row r * n + p holds rank r of piece p
        entry[1][p::n, col:col + width] = (b.float().T * scaling).to(dtype)
    return LoRAAdapter(path, rank, scaling, tuple(targets), weights)

"""Naming LoRA adapters: the forms of --lora-paths and the module names an adapter may target.

Torch-free, so that the config and the API process can use it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Projections of a Llama-family decoder layer that an adapter may target (HF / PEFT names).
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRANotFoundError(LookupError):
    """A request names an adapter that is not loaded (404 over HTTP)."""


@dataclass(frozen=True)
class LoRARef:
    name: str
    path: str
    pinned: bool = False


def parse_lora_ref(value: str | dict) -> LoRARef:
    """One --lora-paths item: `PATH` (named after the path), `NAME=PATH`, or a JSON object
    {"lora_name", "lora_path", "pinned"} (also accepted as a dict from Python)."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"--lora-paths item {value!r} is not valid JSON: {e}") from None
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"lora_name", "lora_path", "pinned"})
        if unknown:
            raise ValueError(f"--lora-paths item {value!r}: unknown key(s) {', '.join(unknown)} "
                             f"(expected lora_name, lora_path, pinned)")
        name, path, pinned = value.get("lora_name"), value.get("lora_path"), value.get("pinned", False)
        if not isinstance(path, str) or not path:
            raise ValueError(f"--lora-paths item {value!r} needs a lora_path")
        if name is None:
            name = path
        if not isinstance(pinned, bool):
            raise ValueError(f"--lora-paths item {value!r}: pinned must be true or false")
        return _checked(LoRARef(name, path, pinned))
    if not isinstance(value, str):
        raise ValueError(f"--lora-paths item {value!r} must be PATH, NAME=PATH or a JSON object")
    name, sep, path = value.partition("=")
    return _checked(LoRARef(name, path) if sep else LoRARef(value, value))


def _checked(ref: LoRARef) -> LoRARef:
    if not isinstance(ref.name, str) or not ref.name:
        raise ValueError(f"LoRA adapter {ref.path!r}: the name must be a non-empty string")
    if not ref.path:
        raise ValueError(f"LoRA adapter {ref.name!r}: the path is empty")
    return ref


def parse_lora_paths(values: Any) -> list[LoRARef]:
    """--lora-paths (a list of items, or a {name: path} dict from Python) → refs with unique names."""
    if not values:
        return []
    if isinstance(values, dict):
        values = [f"{k}={v}" for k, v in values.items()]
    if isinstance(values, str):
        values = [values]
    refs = [parse_lora_ref(v) for v in values]
    seen: set[str] = set()
    for r in refs:
        if r.name in seen:
            raise ValueError(f"--lora-paths names the adapter {r.name!r} twice")
        seen.add(r.name)
    return refs


def parse_target_modules(values: list[str] | None) -> tuple[str, ...] | None:
    """--lora-target-modules → the modules in canonical order ("all" = every projection)."""
    if not values:
        return None
    names = set(values)
    if "all" in names:
        return TARGET_MODULES
    unknown = sorted(names - set(TARGET_MODULES))
    if unknown:
        raise ValueError(f"--lora-target-modules: unsupported module(s) {', '.join(unknown)} "
                         f"(supported: {', '.join(TARGET_MODULES)}, or all)")
    return tuple(m for m in TARGET_MODULES if m in names)

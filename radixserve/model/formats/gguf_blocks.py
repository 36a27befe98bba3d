"""A GGUF checkpoint's own blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K), multiplied as stored by
kernels/gguf_matmul.cpp."""
from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from gguf import GGMLQuantizationType

from radixserve import kernels
from radixserve.config import QUANTIZATIONS
from radixserve.model.formats import kquants
from radixserve.model.formats.dense import DENSE

logger = logging.getLogger(__name__)

# Rows of a weight in one block type: (blocks uint8 [rows, row bytes], GGML type id). A fused weight
# (q/k/v, gate/up) may join pieces of different types: llama.cpp's Q4_K_M files store some v
# projections as Q6_K beside Q4_K q and k.
Segment = tuple[torch.Tensor, int]


def join_segments(pieces: list[list[Segment]]) -> list[Segment]:
    """The pieces' segments in order, neighbours of one type concatenated (one kernel call each)."""
    out: list[Segment] = []
    for blocks, ggml_type in (seg for piece in pieces for seg in piece):
        if out and out[-1][1] == ggml_type:
            out[-1] = (torch.cat([out[-1][0], blocks]), ggml_type)
        else:
            out.append((blocks, ggml_type))
    return out


# Step sizes the start-up measurement tries (see calibrate): decode steps of 1 to 64 requests.
CALIBRATION_STEPS = (1, 2, 4, 8, 16, 32, 64)

# --quantization's names for the block types.
QUANTIZATION_TYPES = {name: GGMLQuantizationType[name.upper()] for name in QUANTIZATIONS}


def quantize_weight(weight: torch.Tensor, ggml_type: GGMLQuantizationType) -> Segment:
    """weight [out, in] as GGUF blocks of ggml_type; Q8_0 where the row length is not a multiple of the
    type's block (a K-quant's 256), as llama.cpp falls back for such tensors."""
    w = weight.detach().float().cpu().numpy()
    if ggml_type in kquants.BYTES and w.shape[1] % kquants.SUPER:
        ggml_type = GGMLQuantizationType.Q8_0
    if w.shape[1] % 32:
        raise ValueError(f"a weight with rows of {w.shape[1]} cannot be stored in GGUF blocks of 32")
    return torch.from_numpy(np.ascontiguousarray(kquants.quantize(w, ggml_type))), int(ggml_type)


class GGUFBlocks:
    """Used by steps of at most max_tokens tokens; the larger steps go to the method it wraps (dense or
    packed), on the layer's full-precision weight."""

    def __init__(self, segments: list[Segment], max_tokens: int, base=DENSE):
        """segments: the weight's rows, as the file's blocks. A decode step reads 4.5-8.5 bits per weight
        instead of 16 or 32, and memory bandwidth is what bounds a step of a few tokens on a CPU."""
        self.matmul = kernels.gguf_matmul()
        if self.matmul is None:
            raise RuntimeError("the GGUF block kernel is not built")
        self.segments = segments
        self.max_tokens = max_tokens
        self.base = base

    @property
    def ggml_types(self) -> set[int]:
        return {t for _, t in self.segments}

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] > self.max_tokens:
            return self.base.apply(x, weight, bias)
        y = self._blocks(x)
        return y if bias is None else y + bias

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.segments) == 1:
            return self.matmul(x, *self.segments[0], 0)
        return torch.cat([self.matmul(x, blocks, t, 0) for blocks, t in self.segments], dim=1)

    def copies(self) -> list[torch.Tensor]:
        return [blocks for blocks, _ in self.segments] + self.base.copies()


def calibrate(layers: list[tuple[GGUFBlocks, torch.Tensor]], cache_path: str | None = None) -> dict[str, int]:
    """Set each block method's max_tokens to the largest step size of CALIBRATION_STEPS (in order, up to
    the first where it loses) at which its kernel multiplied faster than its base method on this CPU.
    layers: every block method in model order, with the weight its base method multiplies; methods of
    the same shapes, formats and base method share one measurement. Which path wins at which step size
    depends on the CPU (on an AVX2-only CPU the float32 dense path loses to the blocks up to much larger
    steps than an AVX-512 CPU's bfloat16 one), so it is measured where the server runs, not fixed.

    Timed the way a step runs them: every weight in model order, so that each is read from where a step
    finds it — memory, for a model larger than the caches. One layer timed on its own stays in cache,
    and its dense path then looks up to 2.4x faster than in a step (Llama 3.2 1B shapes, Zen 4).

    Measurements are kept in cache_path (JSON; keyed by CPU, kernel sources, threads and dtype), so that
    a restarted engine or a new server on this machine takes the same paths — the tokens a request gets
    then do not change with a restart — and does not measure again. Returns {key: max_tokens}."""
    machine = f"{kernels.build_tag()}/{torch.get_num_threads()} threads"
    keys = []
    for method, weight in layers:
        shapes = ",".join(f"{b.shape[0]}x{b.shape[1]}:{t}" for b, t in method.segments)
        keys.append(f"{machine}/{weight.dtype}/{tuple(weight.shape)}/{type(method.base).__name__}/{shapes}")
    known = _read_json(cache_path)
    found = {key: known[key] for key in keys if key in known}
    todo = [(method, weight, key) for (method, weight), key in zip(layers, keys) if key not in found]
    if todo:
        found.update(_measure(todo))
        if cache_path is not None:
            _write_json(cache_path, {**known, **found})
    for (method, _), key in zip(layers, keys):
        method.max_tokens = found[key]
    return found


def _measure(layers: list[tuple[GGUFBlocks, torch.Tensor, str]], reps: int = 3) -> dict[str, int]:
    """Per key: the largest step size its kernel won at. Each round times one pass over every layer
    still undecided with the kernel, then one with the base method (the first round warms up)."""
    best = {key: 0 for _, _, key in layers}
    undecided = set(best)
    with torch.inference_mode():
        for t in CALIBRATION_STEPS:
            live = [layer for layer in layers if layer[2] in undecided]
            if not live:
                break
            inputs = {(w.shape[1], w.dtype): torch.randn(t, w.shape[1], dtype=w.dtype) for _, w, _ in live}
            spent = {path: {key: [] for key in undecided} for path in ("blocks", "base")}
            for round_ in range(reps + 1):
                for path, times in spent.items():
                    total = dict.fromkeys(undecided, 0.0)
                    for method, weight, key in live:
                        x = inputs[weight.shape[1], weight.dtype]
                        start = time.perf_counter()
                        method._blocks(x) if path == "blocks" else method.base.apply(x, weight, None)
                        total[key] += time.perf_counter() - start
                    if round_:
                        for key, seconds in total.items():
                            times[key].append(seconds)
            for key in list(undecided):
                if statistics.median(spent["blocks"][key]) < statistics.median(spent["base"][key]):
                    best[key] = t
                else:
                    undecided.discard(key)
    return best


def _read_json(path: str | None) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (TypeError, OSError, ValueError):  # no cache, none yet, or a damaged one: measure
        return {}


def _write_json(path: str, data: dict) -> None:
    """Atomically (a concurrent reader sees the old file or the new one); a cache that cannot be written
    only costs the next start a measurement."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("could not save the GGUF block step sizes to %s: %s", path, e)

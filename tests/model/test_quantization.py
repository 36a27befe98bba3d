"""--quantization: an HF checkpoint's projections and output head quantised into GGUF blocks at load.

The oracle is gguf's own reader: the blocks dequantise to within the type's error of the checkpoint's
weights, and a short step (the block kernel) matches the dense path on those dequantised weights within
what the 8-bit activations cost (BLOCK_RTOL, as for GGUF files)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from kernel_util import built_kernel
from radixserve import kernels
from radixserve.config import ServerArgs
from radixserve.model.formats import QUANTIZATION_TYPES, GGUFBlocks
from radixserve.model.layers import Linear
from radixserve.model.runner import ModelRunner
from test_gguf import BLOCK_RTOL, assert_close_logits, prefill_logits
from tiny_models import build_tiny_model

# Relative RMS error of a weight after quantisation, at most (measured on N(0, 0.2) weights: Q8_0 0.4 %,
# Q6_K 1.5 %, Q5_K 2.5 %, Q4_K 5.2 %, Q4_0/Q4_1 ~7 %).
RMS = {"q8_0": 0.01, "q6_k": 0.03, "q5_k": 0.05, "q4_k": 0.08, "q4_0": 0.12, "q4_1": 0.1}


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> str:
    """Rows of 256 and 512 weights (K-quants need multiples of 256), head untied, vocab 1000."""
    built_kernel(kernels.gguf_matmul(), "GGUF")
    return build_tiny_model(str(tmp_path_factory.mktemp("wide-llama")), "llama", hidden_size=256,
                            intermediate_size=512, vocab_size=1000, tie_word_embeddings=False)


def runner(path: str, **kw) -> ModelRunner:
    return ModelRunner(ServerArgs(model_path=path, dtype="float32", device="cpu", max_total_tokens=64,
                                  max_running_requests=2, **kw))


def methods(r: ModelRunner) -> list[tuple[GGUFBlocks, torch.Tensor]]:
    """Every linear's method and the head's, with the weight each quantised."""
    model = r.model
    return [(m.method, m.weight) for m in model.modules() if isinstance(m, Linear)] + \
        [(model.head_method, model._head_weight())]


def dequantised(method: GGUFBlocks) -> torch.Tensor:
    parts = [dequantize(blocks.numpy(), Q(t)).reshape(blocks.shape[0], -1) for blocks, t in method.segments]
    return torch.from_numpy(np.concatenate(parts).astype(np.float32))


@pytest.mark.parametrize("name", list(QUANTIZATION_TYPES))
def test_every_projection_and_the_head_quantised(wide_llama, name):
    r = runner(wide_llama, quantization=name, int4_decode_tokens=4)
    for method, weight in methods(r):
        assert isinstance(method, GGUFBlocks) and method.max_tokens == 4
        assert method.ggml_types == {int(QUANTIZATION_TYPES[name])}
        deq = dequantised(method)
        assert deq.shape == weight.shape
        assert ((deq - weight).pow(2).mean().sqrt() / weight.std()).item() < RMS[name]


def test_rows_the_type_cannot_hold_take_q8_0(tiny_model_dir):
    """The default tiny model's rows are 64 and 128 weights: no K-quant super-block fits them."""
    r = runner(tiny_model_dir("llama"), quantization="q4_k", int4_decode_tokens=4)
    assert all(m.ggml_types == {int(Q.Q8_0)} for m, _ in methods(r)[:-1])


def test_short_steps_match_the_dequantised_weights(wide_llama):
    quantised = runner(wide_llama, quantization="q4_k", int4_decode_tokens=4)
    reference = runner(wide_llama, int4_decode_tokens=0)
    with torch.no_grad():
        for (method, _), (_, weight) in zip(methods(quantised), methods(reference)):
            weight.copy_(dequantised(method))
    ids = torch.randint(0, 1000, (4,), generator=torch.Generator().manual_seed(3))
    assert_close_logits(prefill_logits(quantised, ids), prefill_logits(reference, ids), BLOCK_RTOL)


def test_refused_where_it_cannot_apply(default_model):
    with pytest.raises(ValueError, match="GGUF file keeps its own block types"):
        ServerArgs(model_path=default_model, quantization="q4_k")
    with pytest.raises(ValueError, match="needs the block kernel"):
        ServerArgs(model_path="/some/hf/folder", quantization="q8_0", int4_decode_tokens=0)

"""Engine-test fixtures: a tiny-model Scheduler factory; torch limited to one thread while they run
(CPU forward passes of small shapes are much slower with contended OpenMP threads)."""
from __future__ import annotations

import pytest
import torch

from radixserve.config import ServerArgs
from radixserve.engine.scheduler import Scheduler


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_DEFAULTS = dict(dtype="float32", device="cpu", max_total_tokens=4096, max_running_requests=8,
                     chunked_prefill_size=256)


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dir) -> str:
    return tiny_model_dir("llama")


@pytest.fixture
def tiny(tiny_llama):
    """Factory: tiny(**ServerArgs overrides) -> a fresh Scheduler over the tiny random Llama."""

    def make(**overrides) -> Scheduler:
        kw = dict(TINY_DEFAULTS, model_path=tiny_llama)
        kw.update(overrides)
        return Scheduler(ServerArgs(**kw))

    return make

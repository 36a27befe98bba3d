"""LoRA logits against peft's merged model on the same weights (float32), through the engine's own
batch layout (engine/batch.py) and the paged KV pool: prefill, step-by-step decode, and one forward
pass mixing the base model and several adapters of different ranks and target sets.

Tolerance: max |ours - peft| <= 1e-4 * max |peft logit|, as for the base model against transformers
(tests/model/test_llama_logits.py): both sides compute in float32 (peft on merged weights, ours as
base + B·A·x), differing by op order only (measured ~1e-6 of the logit scale). Each adapter moves the
logits by more than 1% of the scale, so a missing or misplaced delta cannot pass.
"""
from __future__ import annotations

import pytest
import torch

from radixserve.config import ServerArgs
from radixserve.engine.batch import build_batch
from radixserve.engine.request import Request
from radixserve.lora import ops
from radixserve.lora.manager import LoRAManager
from radixserve.lora.refs import parse_lora_paths
from radixserve.model.runner import ModelInput, ModelRunner
from radixserve.sampling.params import SamplingParams

from lora_adapters import ALL, TINY_ADAPTERS, build_adapter, load_hf_base, peft_merged

RTOL = 1e-4
POOL = 160


class LoRARun:
    """A float32 runner + LoRA manager driven step by step the way the scheduler drives them. A GGUF base
    multiplies its dequantised weights at every step size (int4_decode_tokens 0): the oracle's arithmetic."""

    def __init__(self, base: str, adapters: dict[str, str], **kw):
        args = ServerArgs(model_path=base, dtype="float32", device="cpu", max_total_tokens=POOL, max_running_requests=8,
                          lora_paths=[f"{n}={p}" for n, p in adapters.items()], int4_decode_tokens=0, **kw)
        self.runner = ModelRunner(args)
        g = torch.Generator().manual_seed(123)  # noise in the pool: wrong reads must show
        for cache in (self.runner.kv.k, self.runner.kv.v):
            cache[:, :, 1:] = torch.randn(cache[:, :, 1:].shape, generator=g) * 5
        self.lora = LoRAManager(self.runner.config.num_layers, self.runner.lora_buffers, self.runner.lora_layout,
                                self.runner.dtype, args.max_loras_per_batch, args.max_loaded_loras,
                                parse_lora_paths(args.lora_paths))
        self.free = iter(torch.randperm(POOL, generator=torch.Generator().manual_seed(7)).add(1).tolist())

    def request(self, prompt: torch.Tensor, adapter: str | None) -> Request:
        lid = self.lora.id_of(adapter) if adapter else 0
        if lid:
            self.lora.acquire(lid)
        req = Request(rid=str(id(prompt)), prompt_ids=prompt.tolist(), params=SamplingParams(), seed=0, lora_id=lid)
        req.row = self.runner.kv.alloc_row()
        return req

    def step(self, entries: list[tuple[Request, int]], every_position: bool = False) -> torch.Tensor:
        slots = torch.tensor([next(self.free) for _ in range(sum(n for _, n in entries))])
        ids = {r.lora_id for r, _ in entries if r.lora_id}
        kv = self.runner.kv.req_to_token
        if ids:
            batch = build_batch(entries, slots, kv, self.runner.device, self.lora.prepare(ids),
                                max(self.lora.rank(i) for i in ids), self.lora.buffers.num_slots,
                                self.lora.linears(ids))
        else:
            batch = build_batch(entries, slots, kv, self.runner.device)
        inp = batch.model_input
        if every_position:
            inp = ModelInput(inp.input_ids, inp.positions, inp.meta, torch.arange(len(inp.input_ids)), inp.lora)
        out = self.runner.forward(inp)
        for req, n in entries:
            req.num_computed += n
        return out


def assert_close(ours: torch.Tensor, ref: torch.Tensor, base: torch.Tensor | None = None) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = ref.abs().max().item()
    assert scale > 1.0
    err = (ours - ref).abs().max().item()
    assert err <= RTOL * scale, f"max abs diff {err:.3g} > {RTOL:g} * logit scale {scale:.3g}"
    if base is not None:  # the adapter really changes the output
        assert (ref - base).abs().max().item() > 1e-2 * scale


def random_ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def refs(tiny_llama, tiny_adapters):
    """name → peft merged model (None → the base model in transformers)."""
    base = load_hf_base(tiny_llama)
    models = {name: peft_merged(base, path) for name, path in tiny_adapters.items()}
    models[None] = base
    return models


def ref_logits(refs, name, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return refs[name](ids[None]).logits[0].float()


@pytest.fixture
def run(tiny_llama, tiny_adapters) -> LoRARun:
    return LoRARun(tiny_llama, tiny_adapters, max_loras_per_batch=3)


@pytest.mark.parametrize("name", sorted(TINY_ADAPTERS))
def test_prefill_matches_peft(run, refs, name):
    ids = random_ids(20, seed=1)
    ours = run.step([(run.request(ids, name), 20)], every_position=True)
    assert_close(ours, ref_logits(refs, name, ids), ref_logits(refs, None, ids))


@pytest.mark.parametrize("name", sorted(TINY_ADAPTERS))
def test_decode_steps_match_peft(run, refs, name):
    ids = random_ids(16, seed=2)
    req = run.request(ids[:5], name)
    ours = [run.step([(req, 5)])]
    for pos in range(5, 16):
        req.output_ids.append(int(ids[pos]))  # teacher forcing: decode the reference's next token
        ours.append(run.step([(req, 1)]))
    assert_close(torch.cat(ours), ref_logits(refs, name, ids)[4:], ref_logits(refs, None, ids)[4:])


@pytest.mark.parametrize("path", ["stacked", "grouped"])
def test_mixed_batch_of_base_and_adapters(run, refs, monkeypatch, path):
    """One forward pass per step for the base and three adapters (ranks 4, 8, 16; two requests share an
    adapter), prefill chunks and decodes together; then a fourth adapter takes a slot (3 slots). Both
    LoRA paths (lora/ops.py), forced."""
    monkeypatch.setattr(ops, "STACKED_SLACK", 10**9 if path == "stacked" else -10**9)
    names = [None, "r4_qv", "r8_all", "r16_mlp_rslora", "r8_all"]
    seqs = [random_ids(n, seed=10 + i) for i, n in enumerate((14, 9, 20, 12, 17))]
    ref = [ref_logits(refs, name, s) for name, s in zip(names, seqs)]
    prompt_lens = [12, 8, 20, 10, 16]
    reqs = [run.request(s[:p], name) for s, p, name in zip(seqs, prompt_lens, names)]
    # Step 1: prefill; request 2's chunk leaves it unfinished.
    first = [12, 8, 7, 10, 16]
    out = run.step(list(zip(reqs, first)))
    done = [i for i in range(5) if i != 2]
    assert_close(out, torch.stack([ref[i][first[i] - 1] for i in done]))
    # Step 2: decodes (teacher-forced) + the rest of request 2's prompt over its cached prefix.
    for i in done:
        reqs[i].output_ids.append(int(seqs[i][prompt_lens[i]]))
    entries = [(reqs[i], 1) for i in done] + [(reqs[2], 13)]
    out = run.step(entries)
    assert_close(out, torch.stack([ref[i][prompt_lens[i]] for i in done] + [ref[2][19]]))
    # Step 3: the fourth adapter needs a slot: one of the others (none in this step) gives it up.
    other = random_ids(11, seed=20)
    req = run.request(other, "r8_kv_alpha")
    reqs[0].output_ids.append(int(seqs[0][13]))
    out = run.step([(reqs[0], 1), (req, 11)])
    assert_close(out, torch.stack([ref[0][13], ref_logits(refs, "r8_kv_alpha", other)[10]]))
    assert "r8_kv_alpha" in {e.name for e in run.lora.entries.values() if e.id in run.lora.buffers.slot_of}


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_other_families(tmp_path, tiny_model_dir, arch):
    """QKV bias (Qwen2) and q/k norm after the projection (Qwen3): the delta goes on the projection."""
    path = tiny_model_dir(arch)
    base = load_hf_base(path)
    adapter = build_adapter(path, str(tmp_path / "ad"), r=8, targets=ALL, b_std=0.05, seed=5, base=base)
    run = LoRARun(path, {"ad": adapter})
    ids = random_ids(20, seed=3)
    ours = run.step([(run.request(ids, "ad"), 20)], every_position=True)
    with torch.no_grad():
        ref, plain = peft_merged(base, adapter)(ids[None]).logits[0], base(ids[None]).logits[0]
    assert_close(ours, ref, plain)


def test_default_gguf_model(default_model, default_hf_model, default_adapters, tokenizer):
    """The real Q4_1 GGUF model (dequantised at load) with adapters built on transformers' copy of it."""
    run = LoRARun(default_model, {n: default_adapters[n] for n in ("all", "mlp")})
    ids = torch.tensor(tokenizer("The quick brown fox jumps over the lazy dog. Paris is the capital of")["input_ids"])
    with torch.no_grad():
        plain = default_hf_model(ids[None]).logits[0]
    for name in ("all", "mlp"):
        ours = run.step([(run.request(ids, name), len(ids))], every_position=True)
        with torch.no_grad():
            ref = peft_merged(default_hf_model, default_adapters[name])(ids[None]).logits[0]
        assert_close(ours, ref, plain)

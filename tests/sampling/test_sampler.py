import math

import pytest
import torch

from kernel_util import built_kernel
from radixserve import kernels
from radixserve.sampling.params import SamplingParams
from radixserve.sampling.sampler import Sampler

CPU = torch.device("cpu")


def draws(params: SamplingParams, logits_row: torch.Tensor, rows: int = 256, steps: int = 8) -> torch.Tensor:
    """Many independent samples: `rows` rows with distinct seeds, each over `steps` steps."""
    V = logits_row.shape[0]
    s = Sampler(rows, V, CPU)
    for r in range(rows):
        s.set_row(r, params, [], seed=1000 + r)
    idx = torch.arange(rows)
    logits = logits_row.expand(rows, V).contiguous()
    out = [s.sample(logits, idx, torch.full((rows,), t)).next_ids for t in range(steps)]
    return torch.cat(out)


def freqs(ids: torch.Tensor, V: int) -> torch.Tensor:
    return torch.bincount(ids, minlength=V).double() / ids.numel()


def ref_penalize(logits, prompt, output, freq, pres, rep):
    out = logits.clone()
    counts = {}
    for t in output:
        counts[t] = counts.get(t, 0) + 1
    for t in set(prompt) | set(output):
        v = out[t].item()
        out[t] = v / rep if v > 0 else v * rep
    for t, c in counts.items():
        out[t] -= freq * c + pres
    return out


def test_greedy_is_argmax_unsorted_rows():
    torch.manual_seed(0)
    s = Sampler(8, 50, CPU)
    for r in range(8):
        s.set_row(r, SamplingParams(temperature=0), [1, 2, 3])
    rows = torch.tensor([5, 1, 7, 2])
    logits = torch.randn(4, 50)
    out = s.sample(logits, rows, torch.zeros(4, dtype=torch.long))
    assert torch.equal(out.next_ids, logits.argmax(-1))
    assert out.logprobs is None and out.top_ids is None and out.top_logprobs is None


def test_top_k_support_and_distribution():
    torch.manual_seed(1)
    logits = torch.randn(8) * 1.5
    ids = draws(SamplingParams(top_k=3, temperature=1.0), logits, steps=10)
    top3 = set(logits.topk(3).indices.tolist())
    assert set(ids.unique().tolist()) == top3
    expected = torch.full((8,), float("-inf"))
    expected[list(top3)] = logits[list(top3)]
    assert torch.allclose(freqs(ids, 8), expected.softmax(-1).double(), atol=0.04)


@pytest.mark.parametrize(
    "kw,expected",
    [
        (dict(top_p=0.8), {0, 1}),
        (dict(top_p=0.81), {0, 1, 2}),
        (dict(top_p=0.3), {0}),
        (dict(top_p=1.0), {0, 1, 2, 3}),
        (dict(min_p=0.2), {0, 1, 2}),
        (dict(min_p=0.5), {0, 1}),
        (dict(top_k=3, min_p=0.5), {0, 1}),
        (dict(top_k=1, top_p=0.99), {0}),
    ],
)
def test_filters_keep_expected_set(kw, expected):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    ids = draws(SamplingParams(**kw), probs.log(), rows=128, steps=8)
    assert set(ids.unique().tolist()) == expected
    if expected == {0, 1}:
        assert abs(freqs(ids, 4)[0].item() - 0.625) < 0.05


def test_sampling_matches_softmax_with_temperature():
    torch.manual_seed(2)
    V, T = 6, 0.7
    logits = torch.randn(V)
    ids = draws(SamplingParams(temperature=T, seed=None), logits, rows=64, steps=160)
    assert torch.allclose(freqs(ids, V), (logits / T).softmax(-1).double(), atol=0.025)


def test_seeded_reproducible_across_rows_and_batches():
    torch.manual_seed(3)
    V = 64
    p = SamplingParams(temperature=0.9, top_p=0.95, min_p=0.01, seed=42)
    a, b = Sampler(8, V, CPU), Sampler(16, V, CPU)
    a.set_row(6, p, [1, 2])
    b.set_row(0, p, [1, 2])
    for r in (1, 3):
        a.set_row(r, SamplingParams(temperature=1.3, top_k=5), [3], seed=r)
    a.set_row(2, SamplingParams(temperature=0), [3])
    seq_a, seq_b = [], []
    for t in range(30):
        target = torch.randn(V)
        la = torch.randn(4, V)
        la[2] = target
        oa = a.sample(la, torch.tensor([3, 1, 6, 2]), torch.tensor([9, 0, t, 4]))
        ob = b.sample(target[None], torch.tensor([0]), torch.tensor([t]))
        seq_a.append(oa.next_ids[2].item())
        seq_b.append(ob.next_ids[0].item())
    assert seq_a == seq_b
    # Same seed and step again -> same token.
    target = torch.randn(V)
    first = b.sample(target[None], torch.tensor([0]), torch.tensor([5])).next_ids
    assert torch.equal(first, b.sample(target[None], torch.tensor([0]), torch.tensor([5])).next_ids)


def test_different_seeds_differ():
    V = 100
    s = Sampler(2, V, CPU)
    s.set_row(0, SamplingParams(), [], seed=1)
    s.set_row(1, SamplingParams(), [], seed=2)
    logits = torch.zeros(2, V)
    seqs = [s.sample(logits, torch.tensor([0, 1]), torch.tensor([t, t])).next_ids for t in range(20)]
    seqs = torch.stack(seqs)
    assert (seqs[:, 0] != seqs[:, 1]).sum() >= 15
    # Different steps of one seed also differ (the counter advances the stream).
    assert seqs[:, 0].unique().numel() >= 12


def test_noise_is_finite_and_exponential():
    s = Sampler(1, 4096, CPU)
    seeds = torch.tensor([0, -1, 2**62, -(2**63)])
    log_e = s._log_exp_noise(seeds, torch.tensor([0, 1, 2**40, 7]))
    assert torch.isfinite(log_e).all()
    e = log_e.exp().double()
    assert abs(e.mean().item() - 1.0) < 0.03
    assert abs((e > 1).double().mean().item() - math.exp(-1)) < 0.02


def test_logprobs_are_raw_log_softmax():
    torch.manual_seed(4)
    V = 30
    s = Sampler(4, V, CPU)
    s.set_row(0, SamplingParams(temperature=0.5, logprobs=True, frequency_penalty=1.0), [1], [2, 2])
    s.set_row(1, SamplingParams(temperature=0, top_logprobs=2), [1])
    s.set_row(2, SamplingParams(temperature=0.8, top_logprobs=5, top_k=4), [1])
    s.set_row(3, SamplingParams(), [1])
    logits = torch.randn(4, V) * 3
    out = s.sample(logits, torch.tensor([0, 1, 2, 3]), torch.arange(4))
    ref = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.next_ids[:, None]).squeeze(1), atol=1e-6)
    assert out.top_ids.shape == (4, 5) and out.top_logprobs.dtype == torch.float32
    tv, ti = ref.topk(5, -1)
    assert torch.equal(out.top_ids, ti)
    assert torch.allclose(out.top_logprobs, tv, atol=1e-6)
    only_lp = s.sample(logits[:1], torch.tensor([0]), torch.tensor([0]))
    assert only_lp.logprobs is not None and only_lp.top_ids is None


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """bool [B, V] → the grammar backend's packed int32 bitmask [B, ceil(V/32)]."""
    B, V = mask.shape
    padded = torch.zeros(B, (V + 31) // 32 * 32, dtype=torch.int64)
    padded[:, :V] = mask.long()
    words = (padded.view(B, -1, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def test_token_bitmask_applies_to_greedy_and_sampled():
    torch.manual_seed(5)
    V = 40  # two bitmask words, the second one partly used
    s = Sampler(64, V, CPU)
    for r in range(64):
        s.set_row(r, SamplingParams(temperature=0 if r % 2 == 0 else 1.5), [], seed=r)
    logits = torch.randn(64, V)
    mask = torch.zeros(64, V, dtype=torch.bool)
    mask[:, [3, 7, 31, 38]] = True
    mask[0, 3] = False  # row-specific mask
    mask[1] = True  # an unconstrained row in the same batch
    for t in range(5):
        ids = s.sample(logits, torch.arange(64), torch.full((64,), t), token_bitmask=_pack(mask)).next_ids
        assert mask.gather(1, ids[:, None]).all()
        masked = logits.masked_fill(~mask, float("-inf"))
        assert torch.equal(ids[0::2], masked[0::2].argmax(-1))


def test_logprobs_under_a_bitmask_describe_the_allowed_tokens():
    torch.manual_seed(6)
    V = 50
    s = Sampler(2, V, CPU)
    s.set_row(0, SamplingParams(temperature=0, top_logprobs=3), [1])
    s.set_row(1, SamplingParams(temperature=1.0, logprobs=True), [1], seed=1)
    logits = torch.randn(2, V)
    mask = torch.rand(2, V) > 0.5
    mask[:, 0] = True
    out = s.sample(logits, torch.tensor([0, 1]), torch.tensor([0, 0]), token_bitmask=_pack(mask))
    ref = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), -1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.next_ids[:, None]).squeeze(1), atol=1e-6)
    assert mask.gather(1, out.top_ids).all()


PEN_CASES = [
    SamplingParams(temperature=0, frequency_penalty=0.7),
    SamplingParams(temperature=0, presence_penalty=-1.2),
    SamplingParams(temperature=0, repetition_penalty=1.8),
    SamplingParams(temperature=0, repetition_penalty=0.6, frequency_penalty=0.5, presence_penalty=0.9),
    SamplingParams(temperature=0),  # no penalty: must be left untouched
]


def test_penalties_match_reference():
    torch.manual_seed(6)
    V = 20
    s = Sampler(8, V, CPU)
    prompts = [torch.randint(0, V, (6,)).tolist() for _ in PEN_CASES]
    outputs = [torch.randint(0, V, (8,)).tolist() for _ in PEN_CASES]
    rows = [7, 0, 3, 5, 1]
    for r, p, pr, o in zip(rows, PEN_CASES, prompts, outputs):
        s.set_row(r, p, pr, o)
    for _ in range(40):
        logits = torch.randn(len(rows), V) * 2
        ref = torch.stack([
            ref_penalize(logits[i], prompts[i], outputs[i], p.frequency_penalty, p.presence_penalty,
                         p.repetition_penalty)
            for i, p in enumerate(PEN_CASES)
        ])
        got = s.sample(logits, torch.tensor(rows), torch.zeros(len(rows), dtype=torch.long)).next_ids
        assert torch.equal(got, ref.argmax(-1))
    flags = s._flags[torch.tensor(rows), 2]
    assert torch.allclose(s._apply_penalties(logits, torch.tensor(rows), flags), ref, atol=1e-5)


def test_record_matches_set_row_with_outputs():
    torch.manual_seed(7)
    V = 12
    p = SamplingParams(temperature=0, frequency_penalty=0.4, presence_penalty=0.3, repetition_penalty=1.3)
    prompt = [1, 2, 2, 5]
    a, b = Sampler(4, V, CPU), Sampler(4, V, CPU)
    a.set_row(2, p, prompt)
    a.set_row(0, SamplingParams(temperature=0), [0])
    generated = []
    for t in range(15):
        logits = torch.randn(2, V)
        out = a.sample(logits, torch.tensor([0, 2]), torch.tensor([t, t])).next_ids
        ref = ref_penalize(logits[1], prompt, generated, 0.4, 0.3, 1.3)
        assert out[1].item() == ref.argmax().item()
        a.record(torch.tensor([0, 2]), out)
        generated.append(out[1].item())
    assert a._counts[2].tolist() == torch.bincount(torch.tensor(generated), minlength=V).tolist()
    b.set_row(1, p, prompt, generated)
    assert torch.equal(a._counts[2], b._counts[1])
    assert torch.equal(a._in_prompt[2], b._in_prompt[1])
    logits = torch.randn(1, V)
    ra = a._apply_penalties(logits, torch.tensor([2]), torch.tensor([True]))
    rb = b._apply_penalties(logits, torch.tensor([1]), torch.tensor([True]))
    assert torch.equal(ra, rb)
    # Re-admitting the row for a fresh request resets its state.
    a.set_row(2, p, [3])
    assert a._counts[2].sum().item() == 0 and a._in_prompt[2].nonzero().flatten().tolist() == [3]


def test_penalty_tables_are_lazy():
    s = Sampler(4, 10, CPU)
    s.set_row(0, SamplingParams(), [1, 2])
    s.record(torch.tensor([0]), torch.tensor([3]))
    assert s._counts is None
    s.set_row(1, SamplingParams(presence_penalty=0.5), [1])
    assert s._counts is not None and s._counts.dtype == torch.int32


def test_tiny_top_p_keeps_top_token_even_when_not_first():
    probs = torch.tensor([0.05, 0.15, 0.3, 0.5])
    ids = draws(SamplingParams(top_p=1e-7), probs.log(), rows=32, steps=4)
    assert set(ids.unique().tolist()) == {3}


@pytest.fixture(scope="module")
def race():
    return built_kernel(kernels.exponential_race(), "sampling")


@pytest.mark.parametrize("rows, vocab, scale", [(512, 1000, 1.0), (64, 49152, 3.0), (16, 7, 0.5), (8, 513, 30.0)])
def test_race_kernel_draws_what_the_torch_path_draws(race, rows, vocab, scale):
    """The C++ race against the torch reference (logits - log E).argmax, with masked tokens, seeds over the
    whole int64 range and large step counters. Its log may differ by an ulp, so a row whose two best
    reference scores are within 1e-4 may go either way; every other row must agree."""
    g = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=g) * scale
    logits[torch.rand(rows, vocab, generator=g) < 0.3] = float("-inf")
    logits[:, 0] = 0.0  # one allowed token per row at least
    seeds = torch.randint(-2**63, 2**63 - 1, (rows,), generator=g)
    steps = torch.randint(0, 2**40, (rows,), generator=g)
    scores = logits - Sampler(1, vocab, CPU)._log_exp_noise(seeds, steps)
    top2 = scores.topk(min(2, vocab), dim=-1).values
    clear = (top2[:, 0] - top2[:, -1]) > 1e-4
    got = race(logits, seeds, steps)
    assert torch.equal(got[clear], scores.argmax(-1)[clear])
    assert clear.float().mean() > 0.95
    assert race(logits[::2].t().contiguous().t(), seeds[::2], steps[::2]).equal(got[::2])  # layout-free


def test_race_kernel_edge_rows(race):
    """All but one token masked; a row of -inf only (argmax's answer: token 0); one token far above the
    rest is always drawn."""
    logits = torch.full((3, 2000), float("-inf"))
    logits[0, 1234] = -5.0
    logits[2] = torch.zeros(2000)
    logits[2, 1999] = 60.0
    seeds, steps = torch.tensor([1, 2, 3]), torch.tensor([0, 0, 0])
    assert race(logits, seeds, steps).tolist() == [1234, 0, 1999]


def test_sampler_uses_the_kernel_on_cpu(race):
    assert Sampler(1, 10, CPU)._race is race

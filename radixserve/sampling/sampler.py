"""Batched, seed-reproducible token sampling over persistent per-request row tables."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from radixserve import kernels
from radixserve.constrained.backend import apply_token_bitmask
from radixserve.sampling.params import SamplingParams

# Float32 cumsum error would otherwise let an exact top_p boundary
# (e.g. 0.5 + 0.3 vs 0.8) pull in one extra token.
_TOP_P_EPS = 1e-6
_NEG_INF = float("-inf")


def _signed64(c: int) -> int:
    c &= (1 << 64) - 1
    return c - (1 << 64) if c >= 1 << 63 else c


# splitmix64 constants, as signed int64 because torch has no uint64 arithmetic.
_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)

# Column layout of the per-row tables.
_TEMP, _TOP_P, _MIN_P, _FREQ, _PRES, _REP = range(6)           # float table
_TOP_K, _SEED, _TOP_LP = range(3)                                # int64 table
_F_GREEDY, _F_LOGPROBS, _F_PENALTY, _F_TOP_K, _F_TOP_P, _F_MIN_P = range(6)  # host bool flags


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; masking off the sign-extended bits
    # makes it the logical shift splitmix64 needs.
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser, in place on z (int64 multiply wraps mod 2**64)."""
    z ^= _srl(z, 30)
    z *= _MIX1
    z ^= _srl(z, 27)
    z *= _MIX2
    z ^= _srl(z, 31)
    return z


@dataclass
class SampleOutput:
    next_ids: torch.Tensor
    logprobs: torch.Tensor | None
    top_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None


class Sampler:
    def __init__(self, max_rows: int, vocab_size: int, device: torch.device) -> None:
        self.max_rows = max_rows
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        # Parameters are edited on the host at admission and pushed to the
        # device at most once per step, so admissions cost no device syncs.
        self._f_host = torch.zeros(max_rows, 6, dtype=torch.float32)
        self._i_host = torch.zeros(max_rows, 3, dtype=torch.int64)
        self._flags = torch.zeros(max_rows, 6, dtype=torch.bool)
        on_cpu = self.device.type == "cpu"
        self._f_dev = self._f_host if on_cpu else self._f_host.to(self.device)
        self._i_dev = self._i_host if on_cpu else self._i_host.to(self.device)
        self._dirty = False
        self._positions = torch.arange(vocab_size, device=self.device)
        # Per-token offsets of the splitmix64 stream (state advances by GOLDEN).
        self._tok_offsets = torch.arange(1, vocab_size + 1, device=self.device) * _GOLDEN
        # [max_rows, V] tables are big; only pay for them once penalties are used.
        self._counts: torch.Tensor | None = None
        self._in_prompt: torch.Tensor | None = None
        # On the CPU the race runs in a C++ kernel that keeps the noise in registers: the torch path
        # below allocates ~10 [rows, V] tensors per step (250 MB at 64 rows of a 49k vocabulary) and takes
        # 10-20x longer; both draw the same tokens (the kernel's log differs by an ulp at most).
        self._race = kernels.exponential_race() if self.device.type == "cpu" else None

    # ------------------------------------------------------------------ setup
    def set_row(
        self,
        row: int,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        output_ids: Sequence[int] = (),
        seed: int | None = None,
    ) -> None:
        """On admission (or on resume after preemption, with the tokens generated so far).
        seed: the request's effective seed (params.seed or one the scheduler drew)."""
        if not 0 <= row < self.max_rows:
            raise IndexError(f"row {row} out of range [0, {self.max_rows})")
        p = params
        if seed is None:
            seed = p.seed if p.seed is not None else random.getrandbits(63)
        greedy = p.is_greedy()
        top_k = self.vocab_size if p.top_k < 0 else min(p.top_k, self.vocab_size)
        top_lp = max(0, int(p.top_logprobs))
        penalty = p.frequency_penalty != 0 or p.presence_penalty != 0 or p.repetition_penalty != 1
        self._f_host[row] = torch.tensor(
            [1.0 if greedy else p.temperature, p.top_p, p.min_p,
             p.frequency_penalty, p.presence_penalty, p.repetition_penalty]
        )
        self._i_host[row] = torch.tensor([top_k, _signed64(seed), top_lp])
        # Filters on greedy rows are no-ops, so they must not force a sort.
        self._flags[row] = torch.tensor([
            greedy, p.logprobs or top_lp > 0, penalty,
            not greedy and top_k < self.vocab_size,
            not greedy and p.top_p < 1.0,
            not greedy and p.min_p > 0.0,
        ])
        self._dirty = True
        if penalty:
            self._ensure_penalty_tables()
            assert self._counts is not None and self._in_prompt is not None
            out = torch.as_tensor(list(output_ids), dtype=torch.int64, device=self.device)
            self._counts[row].copy_(torch.bincount(out, minlength=self.vocab_size))
            self._in_prompt[row].zero_()
            if len(prompt_ids):
                ids = torch.as_tensor(list(prompt_ids), dtype=torch.int64, device=self.device)
                self._in_prompt[row, ids] = True

    def _ensure_penalty_tables(self) -> None:
        if self._counts is None:
            shape = (self.max_rows, self.vocab_size)
            self._counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            self._in_prompt = torch.zeros(shape, dtype=torch.bool, device=self.device)

    def _sync_tables(self) -> None:
        if self._dirty:
            if self._f_dev is not self._f_host:
                self._f_dev.copy_(self._f_host)
                self._i_dev.copy_(self._i_host)
            self._dirty = False

    # ------------------------------------------------------------------- step
    def sample(
        self,
        logits: torch.Tensor,
        rows: torch.Tensor,
        steps: torch.Tensor,
        token_bitmask: torch.Tensor | None = None,
    ) -> SampleOutput:
        """logits float32 [B, V]; rows int64 [B]; steps int64 [B] (tokens generated so far,
        the RNG counter); token_bitmask optional int32 [B, ceil(V/32)], bit t%32 of word t//32 set =
        token t allowed (a grammar's mask; logprobs then describe the constrained distribution)."""
        self._sync_tables()
        dev = self.device
        rows_host = rows.cpu()
        rows_d = rows.to(dev)
        flags = self._flags[rows_host]
        any_greedy, any_lp, any_pen, any_top_k, any_top_p, any_min_p = flags.any(0).tolist()
        all_greedy = bool(flags[:, _F_GREEDY].all())
        logits = logits.to(dev, torch.float32)

        if token_bitmask is not None:
            apply_token_bitmask(logits, token_bitmask)  # in place: the caller's logits are spent
        # Logprobs describe the model's distribution (within the grammar), before penalties and filters.
        logp = torch.log_softmax(logits, dim=-1) if any_lp else None
        if any_pen:
            logits = self._apply_penalties(logits, rows_d, flags[:, _F_PENALTY])

        if all_greedy:
            next_ids = logits.argmax(dim=-1)
        else:
            if any_greedy:
                # Only sampled rows go through temperature/filters/noise.
                sidx = (~flags[:, _F_GREEDY]).nonzero().squeeze(1).to(dev)
                drawn = self._draw(logits[sidx], rows_d[sidx], steps.to(dev)[sidx],
                                   any_top_k or any_top_p, any_top_p, any_min_p)
                next_ids = logits.argmax(dim=-1).index_copy_(0, sidx, drawn)
            else:
                next_ids = self._draw(logits, rows_d, steps.to(dev),
                                      any_top_k or any_top_p, any_top_p, any_min_p)

        lps = top_ids = top_lps = None
        if logp is not None:
            lps = logp.gather(1, next_ids[:, None]).squeeze(1)
            k = min(int(self._i_host[rows_host, _TOP_LP].max()), self.vocab_size)
            if k > 0:
                top_lps, top_ids = logp.topk(k, dim=-1)
        return SampleOutput(next_ids, lps, top_ids, top_lps)

    def _apply_penalties(
        self, logits: torch.Tensor, rows_d: torch.Tensor, has_pen: torch.Tensor
    ) -> torch.Tensor:
        assert self._counts is not None and self._in_prompt is not None
        subset = not bool(has_pen.all())
        if subset:
            pidx = has_pen.nonzero().squeeze(1).to(self.device)
            rows_d, l = rows_d[pidx], logits[pidx]
        else:
            l = logits
        counts = self._counts[rows_d]
        in_output = counts > 0
        f = self._f_dev[rows_d]
        rep = f[:, _REP, None]
        seen = self._in_prompt[rows_d] | in_output
        # Repetition penalty (CTRL-style) always pushes seen tokens toward less likely.
        l = torch.where(seen, torch.where(l > 0, l / rep, l * rep), l)
        # OpenAI frequency/presence penalties count generated tokens only.
        l = l - f[:, _FREQ, None] * counts - f[:, _PRES, None] * in_output
        return logits.index_copy(0, pidx, l) if subset else l

    def _draw(
        self,
        l: torch.Tensor,
        rows_d: torch.Tensor,
        steps: torch.Tensor,
        need_sort: bool,
        any_top_p: bool,
        any_min_p: bool,
    ) -> torch.Tensor:
        f = self._f_dev[rows_d]
        i = self._i_dev[rows_d]
        l = l / f[:, _TEMP, None]
        if need_sort:
            s, order = l.sort(dim=-1, descending=True)
            s = s.masked_fill(self._positions >= i[:, _TOP_K, None], _NEG_INF)
            if any_top_p:
                # Renormalised over the top-k survivors; a token is kept while the
                # mass strictly before it is still short of top_p.
                probs = s.softmax(dim=-1)
                mass_before = probs.cumsum(dim=-1) - probs
                top_p = f[:, _TOP_P]
                thr = torch.where(top_p < 1.0, top_p - _TOP_P_EPS, torch.inf)
                drop = mass_before >= thr[:, None]
                drop[:, 0] = False
                s = s.masked_fill(drop, _NEG_INF)
            l = torch.empty_like(l).scatter_(1, order, s)
        if any_min_p:
            # p < min_p * p_max  <=>  logit < max_logit + log(min_p); log(0) = -inf keeps all.
            lmax = l.amax(dim=-1, keepdim=True)
            l = l.masked_fill(l < lmax + f[:, _MIN_P, None].log(), _NEG_INF)
        # Exponential race: argmax p/E == argmax (logit - log E), so no softmax is needed.
        if self._race is not None:
            return self._race(l, i[:, _SEED], steps)
        return (l - self._log_exp_noise(i[:, _SEED], steps)).argmax(dim=-1)

    def _log_exp_noise(self, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """log E for E ~ Exp(1), a pure function of (seed, step, token) so results do not
        depend on batch composition or row placement."""
        key = _mix64(_mix64(seeds.clone()) + steps)
        z = _mix64(key[:, None] + self._tok_offsets)
        # Top 23 bits + 1/2: u in [2**-24, 1 - 2**-24], exactly representable in
        # float32, so neither log(0) nor E == 0 can occur.
        u = (_srl(z, 41).to(torch.float32) + 0.5) * (2.0 ** -23)
        return torch.log(-torch.log(u))

    def record(self, rows: torch.Tensor, next_ids: torch.Tensor) -> None:
        """Account the accepted tokens for frequency/presence/repetition penalties."""
        if self._counts is None:
            return
        # Rows without penalties never read their counts and are reset by
        # set_row, so updating every row avoids a host-side filter.
        rows_d = rows.to(self.device)
        ids = next_ids.to(self.device, torch.int64)
        ones = torch.ones(rows_d.shape[0], dtype=torch.int32, device=self.device)
        self._counts.index_put_((rows_d, ids), ones, accumulate=True)

"""What greedy, sampling and beam search share: GenerationConfig and the logits processors.

Semantics follow `transformers.generate` (5.x): processors in its order (repetition penalty,
no-repeat n-gram, min new tokens, then temperature, top-k, top-p), `max_new_tokens` counted
without the decoder start token. Pure tensor functions; no model. None of them waits on the
device (no host sync), so a decode loop syncs only where it chooses to.

Sampling draws from the same distribution as transformers' `torch.multinomial`, but by inverse
CDF with one uniform per row per step taken from a per-request table (`sampling_noise`): a row's
samples depend on its request's seed, its row number and the step only, not on the rows that
share the batch, on when finished rows leave it, or on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # transformers' default; only used when sampling
    top_p: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as in transformers
    num_return_sequences: int = 1
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens",
             "0 <= min_new_tokens <= max_new_tokens"),
            (self.num_beams >= 1, "num_beams", "an integer >= 1"),
            (not self.do_sample or self.temperature > 0, "temperature", "> 0 when sampling"),
            (self.top_k >= 0, "top_k", ">= 0 (0 disables it)"),
            (0 < self.top_p <= 1, "top_p", "a value in (0, 1]"),
            (self.early_stopping in (True, False, "never"), "early_stopping", "True, False or 'never'"),
            (1 <= self.num_return_sequences <= max(self.num_beams, 1 if not self.do_sample else 10**9),
             "num_return_sequences", "between 1 and num_beams (or any count when sampling)"),
            (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", ">= 0"),
            (self.repetition_penalty > 0, "repetition_penalty", "> 0"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected {expected}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("do_sample=True with num_beams > 1 (beam sampling) is not supported; use one")


# ---- logits processors: (history (N, t) incl. start token, scores (N, V)) -> scores ----

def repetition_penalty(history: Tensor, scores: Tensor, penalty: float) -> Tensor:
    """CTRL penalty (transformers RepetitionPenaltyLogitsProcessor): divide positive, multiply negative."""
    seen = scores.gather(1, history)
    return scores.scatter(1, history, torch.where(seen < 0, seen * penalty, seen / penalty))


def ban_repeated_ngrams(history: Tensor, scores: Tensor, n: int) -> Tensor:
    """Forbid any token that would complete an n-gram already in the row (NoRepeatNGramLogitsProcessor),
    on the device: every window of n tokens whose first n - 1 equal the row's last n - 1 bans its
    last token. (transformers builds the n-gram table on the host; this gives the same bans
    without a sync.)"""
    t = history.shape[1]
    if t < n:  # no complete n-gram yet
        return scores
    windows = history.unfold(1, n, 1)  # (N, t - n + 1, n)
    match = (windows[..., :-1] == history[:, None, t - n + 1:]).all(-1)  # (N, t - n + 1): prefix == last n - 1
    # scatter_reduce "amax": a token hit by several windows is banned if any of them matches
    banned = torch.zeros_like(scores).scatter_reduce(1, windows[..., -1], match.to(scores.dtype), "amax")
    return scores.masked_fill(banned > 0, float("-inf"))


def top_k_top_p(scores: Tensor, top_k: int, top_p: float) -> Tensor:
    """TopKLogitsWarper then TopPLogitsWarper, keeping at least one token."""
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(-1).cumsum(-1) <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scores


def process(cfg: GenerationConfig, history: Tensor, scores: Tensor, eos: int) -> Tensor:
    """The processors that change which token is best (shared by greedy, sampling and beams)."""
    if cfg.repetition_penalty != 1.0:
        scores = repetition_penalty(history, scores, cfg.repetition_penalty)
    if cfg.no_repeat_ngram_size > 0:
        scores = ban_repeated_ngrams(history, scores, cfg.no_repeat_ngram_size)
    if history.shape[1] - 1 < cfg.min_new_tokens:
        scores = scores.clone()
        scores[:, eos] = float("-inf")
    return scores


def sampling_noise(cfg: GenerationConfig, rows: int, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> Tensor | None:
    """The uniforms a sampling request draws: (rows, max_new_tokens) in [0, 1), row i's at step t
    in [i, t]; None when not sampling (greedy draws nothing). From `generator` on its device, by
    default torch's global CPU generator (what `torch.manual_seed` and `t5kit generate --seed`
    set), then moved to `device`. Drawn whole at the start, row by row: on CPU torch draws
    element by element from one mt19937 stream, so consecutive tables are consecutive stretches
    of it, and prompts generated in several batches draw what one batch of them would."""
    if not cfg.do_sample:
        return None
    where = generator.device if generator is not None else torch.device("cpu")
    return upload(torch.rand(rows, cfg.max_new_tokens, generator=generator, device=where), device)


def upload(x: Tensor, device: torch.device | str | None) -> Tensor:
    """x on `device` without a host sync: a CPU tensor bound for CUDA is pinned and copied
    non-blocking. A copy from pageable memory makes the host wait for the work queued on the
    stream (PyTorch tutorial "A guide on good usage of non_blocking and pin_memory()"); from
    pinned memory it is queued, and the caching host allocator keeps the pinned block until the
    copy's stream event has passed (CachingHostAllocator's recordEvent)."""
    device = torch.device(device) if device is not None else x.device
    if x.device.type == "cpu" and device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def sample(probs: Tensor, noise: Tensor) -> Tensor:
    """Inverse-CDF sampling: probs (N, V), noise (N,) uniforms in [0, 1) -> (N,) for each row the
    first token whose cumulative probability exceeds noise x total. In fp64, so noise x total
    stays below the total (a float32 uniform is at most 1 - 2**-24) and a token of probability 0,
    whose cumulative sum equals its predecessor's, is never the first to exceed it."""
    cdf = probs.double().cumsum(-1)  # (N, V)
    return torch.searchsorted(cdf, noise.double()[:, None] * cdf[:, -1:], right=True).squeeze(1)


def next_token(cfg: GenerationConfig, history: Tensor, logits: Tensor, eos: int, noise: Tensor | None = None) -> Tensor:
    """One greedy or sampling step: history (N, t) incl. start token, fp32 logits (N, V) -> (N,)
    tokens. noise (N,): this step's uniform for each row when sampling (`sampling_noise(...)[:, t]`
    for the rows still running)."""
    scores = process(cfg, history, logits, eos)
    if not cfg.do_sample:
        return scores.argmax(-1)
    if noise is None:
        raise ValueError("sampling needs noise: each row's uniform for this step (sampling_noise)")
    return sample(top_k_top_p(scores / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1), noise)

"""What greedy, sampling and beam search share: GenerationConfig and the logits processors.

Semantics follow `transformers.generate` (5.x): processors in its order (repetition penalty,
no-repeat n-gram, min new tokens, then temperature, top-k, top-p), `max_new_tokens` counted
without the decoder start token. Pure tensor functions; no model.
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
            (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens", "0 <= min_new_tokens <= max_new_tokens"),
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
    """Forbid any token that would complete an n-gram already in the row (NoRepeatNGramLogitsProcessor)."""
    t = history.shape[1]
    if t + 1 < n:
        return scores
    scores = scores.clone()
    for row, seq in enumerate(history.tolist()):
        prefix = tuple(seq[t - n + 1:])
        banned = [seq[i + n - 1] for i in range(t - n + 1) if tuple(seq[i:i + n - 1]) == prefix]
        if banned:
            scores[row, banned] = float("-inf")
    return scores


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


def next_token(cfg: GenerationConfig, history: Tensor, logits: Tensor, eos: int,
               generator: torch.Generator | None = None) -> Tensor:
    """One greedy or sampling step: history (N, t) incl. start token, fp32 logits (N, V) -> (N,)
    tokens. Sampling draws one multinomial over all N rows, so a seeded generator reproduces a
    run only with the same rows in the same order (generate.stream and the serve scheduler)."""
    scores = process(cfg, history, logits, eos)
    if not cfg.do_sample:
        return scores.argmax(-1)
    scores = top_k_top_p(scores / cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)

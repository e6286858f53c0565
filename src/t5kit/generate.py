"""Generation: greedy, sampling (temperature / top-k / top-p), beam search (beam.py), streaming.

Token ids in, token ids out; no start token in the output, rows padded with pad 0 after EOS.
Semantics follow `transformers.generate` (5.x): logits processors in its order (repetition
penalty, no-repeat n-gram, min new tokens, then temperature, top-k, top-p), `max_new_tokens`
counted without the decoder start token.

Speed: the encoder runs once; cross-attention K/V are computed once per request; self-attention
K/V live in a static cache written by index; the decoder's relative bias is computed once and
sliced. Rows that finish are dropped from the batch (on CPU at once, on GPU every `SYNC_EVERY`
steps, so the loop does not wait on the device each token).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import T5

SYNC_EVERY = 16


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


def _next_logits(model: T5, cache, tokens: Tensor) -> Tensor:
    """tokens (N, 1) -> fp32 logits (N, V) of the next token."""
    return model.logits(model.decode(tokens, cache=cache))[:, -1].float()


def _encode(model: T5, input_ids: Tensor, attention_mask: Tensor | None, repeat: int, max_len: int):
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length>0), got shape {tuple(input_ids.shape)}")
    memory = model.encode(input_ids, attention_mask)
    if repeat > 1:  # beams / samples share one encoder pass
        memory = memory.repeat_interleave(repeat, 0)
        attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(repeat, 0)
    return model.new_cache(memory, attention_mask, max_len)


@torch.inference_mode()
def stream(model: T5, input_ids: Tensor, attention_mask: Tensor | None = None,
           generator: torch.Generator | None = None, **kw) -> Iterator[tuple[Tensor, Tensor]]:
    """Greedy / sampling, one step at a time: yields (rows, tokens), the original row indices still
    running and each one's new token. A row's last yielded token is its EOS (or the length cap)."""
    cfg = kw.pop("config", None) or GenerationConfig(**kw)
    if cfg.num_beams > 1:
        raise ValueError("streaming supports greedy and sampling only (num_beams=1)")
    c = model.config
    n = cfg.num_return_sequences
    cache = _encode(model, input_ids, attention_mask, n, cfg.max_new_tokens)
    rows = torch.arange(input_ids.shape[0] * n, device=input_ids.device)
    history = torch.full((len(rows), 1), c.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    on_cpu = input_ids.device.type == "cpu"
    for step in range(cfg.max_new_tokens):
        scores = process(cfg, history, _next_logits(model, cache, history[:, -1:]), c.eos_token_id)
        if cfg.do_sample:
            scores = top_k_top_p(scores / cfg.temperature, cfg.top_k, cfg.top_p)
            token = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            token = scores.argmax(-1)
        yield rows, token
        history = torch.cat([history, token[:, None]], 1)
        if on_cpu or step % SYNC_EVERY == SYNC_EVERY - 1:
            alive = token != c.eos_token_id
            if not alive.all():
                keep = alive.nonzero().squeeze(1)
                if len(keep) == 0:
                    return
                cache.select(keep)
                rows, history = rows[keep], history[keep]


@torch.inference_mode()
def generate(model: T5, input_ids: Tensor, attention_mask: Tensor | None = None, *,
             generator: torch.Generator | None = None, **kw) -> Tensor:
    """(B, S) ids -> (B * num_return_sequences, <= max_new_tokens) ids, padded with pad after EOS.
    Keyword arguments are GenerationConfig's fields (or config=GenerationConfig(...))."""
    cfg = kw.pop("config", None) or GenerationConfig(**kw)
    was_training = model.training
    model.eval()
    try:
        if cfg.num_beams > 1:
            from .beam import beam_search
            return beam_search(model, input_ids, attention_mask, cfg)
        c = model.config
        out = torch.full((input_ids.shape[0] * cfg.num_return_sequences, cfg.max_new_tokens), c.pad_token_id,
                         dtype=torch.long, device=input_ids.device)
        done = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
        length = 0
        for step, (rows, token) in enumerate(stream(model, input_ids, attention_mask, generator, config=cfg)):
            token = torch.where(done[rows], c.pad_token_id, token)  # rows between syncs on GPU
            out[rows, step] = token
            done[rows] |= token == c.eos_token_id
            length = step + 1
        return out[:, :length]
    finally:
        model.train(was_training)


@torch.inference_mode()
def generate_uncached(model: T5, input_ids: Tensor, attention_mask: Tensor | None = None,
                      max_new_tokens: int = 64, no_repeat_ngram_size: int = 0) -> Tensor:
    """Reference greedy decoder: re-runs the whole decoder prefix each step, no cache. The slow
    twin of `generate` for tests (and the oracle where transformers cannot run a shape)."""
    c = model.config
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, no_repeat_ngram_size=no_repeat_ngram_size)
    memory = model.encode(input_ids, attention_mask)
    seq = torch.full((input_ids.shape[0], 1), c.decoder_start_token_id, dtype=torch.long)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        scores = model.logits(model.decode(seq, memory, attention_mask))[:, -1].float()
        token = process(cfg, seq, scores, c.eos_token_id).argmax(-1)
        token = torch.where(done, c.pad_token_id, token)
        seq = torch.cat([seq, token[:, None]], 1)
        done |= token == c.eos_token_id
        if done.all():
            break
    return seq[:, 1:]


@dataclass
class TextResult:
    index: int  # position in the input
    outputs: list[str]  # num_return_sequences texts, best first
    error: str | None = None
    new_tokens: int = 0


def generate_texts(model: T5, tok, texts: list[str], batch_size: int = 16, max_input_tokens: int = 512,
                   truncate: bool = True, progress: bool = False, warn=None, **kw) -> list[TextResult]:
    """Prompts -> TextResult per prompt, in input order. Batches are formed from prompts sorted by
    length (less padding), then the original order is restored. A bad prompt (empty, too long with
    truncate=False) gets an error and the others still get their outputs."""
    from tqdm import tqdm

    cfg = GenerationConfig(**kw)
    results: list[TextResult | None] = [None] * len(texts)
    encoded = []
    for i, text in enumerate(texts):
        ids = tok.encode(text) if text.strip() else None
        if ids is None:
            results[i] = TextResult(i, [], "empty prompt")
        elif len(ids) > max_input_tokens and not truncate:
            results[i] = TextResult(i, [], f"prompt has {len(ids)} tokens, more than --max-input-tokens "
                                           f"{max_input_tokens} (--no-truncate)")
        else:
            if len(ids) > max_input_tokens:
                if warn:
                    warn(f"prompt {i + 1}: {len(ids)} tokens truncated to {max_input_tokens}")
                ids = ids[:max_input_tokens - 1] + [tok.eos_id]
            encoded.append((i, ids))
    encoded.sort(key=lambda x: -len(x[1]))
    device = model.shared.weight.device
    bar = tqdm(total=len(encoded), disable=not progress, unit="prompt", desc="generate")
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for _, ids in chunk)
        input_ids = torch.tensor([ids + [tok.pad_id] * (width - len(ids)) for _, ids in chunk], device=device)
        mask = (torch.arange(width, device=device)[None] < torch.tensor([len(ids) for _, ids in chunk], device=device)[:, None]).long()
        out = generate(model, input_ids, mask, config=cfg).cpu()
        r = cfg.num_return_sequences
        for j, (i, _) in enumerate(chunk):
            rows = out[j * r:(j + 1) * r]
            results[i] = TextResult(i, tok.decode_batch(rows), new_tokens=int((rows != tok.pad_id).sum()))
        bar.update(len(chunk))
    bar.close()
    return results

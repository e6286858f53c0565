"""Generation: greedy, sampling (temperature / top-k / top-p), beam search (beam.py), streaming.

Token ids in, token ids out; no start token in the output, rows padded with pad 0 after EOS.
Semantics follow `transformers.generate` (5.x); the config and logits processors live in
generation.py, the per-token decode step (eager, or CUDA-graph replayed) in engine.py.

Speed: the encoder runs once; cross-attention K/V are computed once per request; self-attention
K/V live in a static cache written by index; the decoder's relative bias is computed once and a
row of it gathered per step. Rows that finish are dropped from the batch (on CPU at once, on GPU
every `engine.SYNC_EVERY` steps, so the loop does not wait on the device each token).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.tokenizer import pad_rows, truncate_ids
from ..model.t5 import T5
from . import engine
from .generation import GenerationConfig, next_token, process


@torch.inference_mode()
def stream(model: T5, input_ids: Tensor, attention_mask: Tensor | None = None,
           generator: torch.Generator | None = None, decode_mode: str = "auto", **kw) -> Iterator[tuple[Tensor, Tensor]]:
    """Greedy / sampling, one step at a time: yields (rows, tokens), the original row indices still
    running and each one's new token. A row's last yielded token is its EOS (or the length cap).
    decode_mode: engine.start's ("auto": CUDA graphs on CUDA, eager elsewhere)."""
    cfg = kw.pop("config", None) or GenerationConfig(**kw)
    if cfg.num_beams > 1:
        raise ValueError("streaming supports greedy and sampling only (num_beams=1)")
    c = model.config
    n = cfg.num_return_sequences
    step = engine.start(model, input_ids, attention_mask, n, cfg.max_new_tokens, decode_mode)
    rows = torch.arange(input_ids.shape[0] * n, device=input_ids.device)
    history = torch.full((len(rows), 1), c.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
    on_cpu = input_ids.device.type == "cpu"
    for t in range(cfg.max_new_tokens):
        token = next_token(cfg, history, step(history[:, -1:]), c.eos_token_id, generator)
        yield rows, token
        history = torch.cat([history, token[:, None]], 1)
        if on_cpu or t % engine.SYNC_EVERY == engine.SYNC_EVERY - 1:
            alive = token != c.eos_token_id
            if not alive.all():
                keep = alive.nonzero().squeeze(1)
                if len(keep) == 0:
                    return
                step.select(keep)
                rows, history = rows[keep], history[keep]


@torch.inference_mode()
def generate(model: T5, input_ids: Tensor, attention_mask: Tensor | None = None, *,
             generator: torch.Generator | None = None, decode_mode: str = "auto", **kw) -> Tensor:
    """(B, S) ids -> (B * num_return_sequences, <= max_new_tokens) ids, padded with pad after EOS.
    Keyword arguments are GenerationConfig's fields (or config=GenerationConfig(...)); decode_mode
    is engine.start's ("auto": CUDA graphs on CUDA, eager elsewhere; "eager", "graph", "compile")."""
    cfg = kw.pop("config", None) or GenerationConfig(**kw)
    was_training = model.training
    model.eval()
    try:
        if cfg.num_beams > 1:
            from .beam import beam_search
            return beam_search(model, input_ids, attention_mask, cfg, decode_mode)
        c = model.config
        out = torch.full((input_ids.shape[0] * cfg.num_return_sequences, cfg.max_new_tokens), c.pad_token_id,
                         dtype=torch.long, device=input_ids.device)
        done = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
        length = 0
        for step, (rows, token) in enumerate(stream(model, input_ids, attention_mask, generator, decode_mode, config=cfg)):
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
                   truncate: bool = True, progress: bool = False, warn=None, decode_mode: str = "auto",
                   **kw) -> list[TextResult]:
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
                ids = truncate_ids(ids, max_input_tokens, tok.eos_id)
            encoded.append((i, ids))
    encoded.sort(key=lambda x: -len(x[1]))
    device = model.shared.weight.device
    bar = tqdm(total=len(encoded), disable=not progress, unit="prompt", desc="generate")
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        input_ids, mask = pad_rows([ids for _, ids in chunk], tok.pad_id, device)
        out = generate(model, input_ids, mask, config=cfg, decode_mode=decode_mode).cpu()
        r = cfg.num_return_sequences
        for j, (i, _) in enumerate(chunk):
            rows = out[j * r:(j + 1) * r]
            results[i] = TextResult(i, tok.decode_batch(rows), new_tokens=int((rows != tok.pad_id).sum()))
        bar.update(len(chunk))
    bar.close()
    return results

"""Generation: greedy, sampling (temperature / top-k / top-p), beam search (beam.py), streaming.

Token ids in, token ids out; no start token in the output, rows padded with pad 0 after EOS.
Semantics follow `transformers.generate` (5.x); the config and logits processors live in
generation.py, the per-token decode step (eager, or CUDA-graph replayed) in engine.py.

Speed: the encoder runs once; cross-attention K/V are computed once per request; self-attention
K/V live in a static cache written by index; the decoder's relative bias is computed once and a
row of it gathered per step. Rows that finish are dropped from the batch (on CPU at once, on GPU
every `engine.SYNC_EVERY` steps, so the loop does not wait on the device each token).

Sampling is seeded per call, not per batch: `generation.sampling_noise` draws one uniform per row
per step up front, so a row's samples do not depend on when finished rows leave (the GPU
schedule), on padded batch buckets, or on the rows around it; `t5kit serve` draws a request's
table the same way from its `seed`, and gives the same outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.tokenizer import pad_rows, truncate_ids
from ..model.t5 import T5
from . import engine
from .generation import GenerationConfig, next_token, process, sampling_noise


class _Rows:
    """The greedy / sampling rows of one call: the decode step, `rows` (which output rows they
    are), each one's history (n, 1 + M) from the start token, and its sampling noise (n, M)."""

    def __init__(self, model: T5, input_ids: Tensor, attention_mask: Tensor | None, cfg: GenerationConfig,
                 generator: torch.Generator | None, decode_mode: str):
        if cfg.num_beams > 1:
            raise ValueError("streaming supports greedy and sampling only (num_beams=1)")
        c, dev, r = model.config, input_ids.device, cfg.num_return_sequences
        self.cfg, self.eos = cfg, c.eos_token_id
        self.step = engine.start(model, input_ids, attention_mask, r, cfg.max_new_tokens, decode_mode)
        n = input_ids.shape[0] * r
        self.rows = torch.arange(n, device=dev)
        self.history = torch.full((n, 1 + cfg.max_new_tokens), c.decoder_start_token_id, dtype=torch.long, device=dev)
        self.noise = sampling_noise(cfg, n, generator, dev)

    def next(self, t: int) -> Tensor:
        """Step t (0-based) -> (n,) each row's token, written to its history."""
        noise = None if self.noise is None else self.noise[:, t]
        token = next_token(self.cfg, self.history[:, :t + 1], self.step(self.history[:, t:t + 1]), self.eos, noise)
        self.history[:, t + 1] = token
        return token

    def keep(self, keep: Tensor) -> None:
        """Keep the rows at positions `keep` (k,) of the current ones."""
        self.step.select(keep)
        self.rows, self.history = self.rows[keep], self.history[keep]
        if self.noise is not None:
            self.noise = self.noise[keep]


@torch.inference_mode()
def stream(model: T5, input_ids: Tensor, attention_mask: Tensor | None = None, generator: torch.Generator | None = None,
           decode_mode: str = "auto", **kw) -> Iterator[tuple[Tensor, Tensor]]:
    """Greedy / sampling, one step at a time: yields (rows, tokens), the original row indices still
    running and each one's new token. A row's last yielded token is its EOS (or the length cap),
    on every device: finished rows leave after each step, at one host sync per step (a consumer
    of streamed tokens reads each step anyway; `generate` syncs less often on GPU).
    decode_mode: engine.start's ("auto": CUDA graphs on CUDA, eager elsewhere)."""
    cfg = kw.pop("config", None) or GenerationConfig(**kw)
    d = _Rows(model, input_ids, attention_mask, cfg, generator, decode_mode)
    for t in range(cfg.max_new_tokens):
        token = d.next(t)
        yield d.rows, token
        alive = (token != d.eos).nonzero().squeeze(1)  # the step's one host sync
        if len(alive) == 0:
            return
        if len(alive) < len(token):
            d.keep(alive)


@torch.inference_mode()
def generate(model: T5, input_ids: Tensor, attention_mask: Tensor | None = None, *,
             generator: torch.Generator | None = None, decode_mode: str = "auto", sync_every: int | None = None,
             **kw) -> Tensor:
    """(B, S) ids -> (B * num_return_sequences, <= max_new_tokens) ids, padded with pad after EOS.
    Keyword arguments are GenerationConfig's fields (or config=GenerationConfig(...)); decode_mode
    is engine.start's ("auto": CUDA graphs on CUDA, eager elsewhere; "eager", "graph", "compile").
    Finished rows leave every `sync_every` steps (default: every step on CPU, engine.SYNC_EVERY on
    GPU); the output does not depend on it.

    Sampling draws `generation.sampling_noise(cfg, B * num_return_sequences, generator)` once: one
    uniform per row per step from `generator`, by default torch's global CPU generator, which
    `torch.manual_seed(seed)` (`t5kit generate --seed`) sets. The same seed gives the same
    samples on every device and whatever the sync schedule, and `t5kit serve` draws a request's
    table the same way from its `seed` (docs/serving.md)."""
    cfg = kw.pop("config", None) or GenerationConfig(**kw)
    was_training = model.training
    model.eval()
    try:
        if sync_every is None:
            sync_every = 1 if input_ids.device.type == "cpu" else engine.SYNC_EVERY
        if cfg.num_beams > 1:
            from .beam import beam_search
            return beam_search(model, input_ids, attention_mask, cfg, decode_mode, sync_every)
        return _generate(model, input_ids, attention_mask, cfg, generator, decode_mode, sync_every)
    finally:
        model.train(was_training)


def _generate(model: T5, input_ids: Tensor, attention_mask: Tensor | None, cfg: GenerationConfig,
              generator: torch.Generator | None, decode_mode: str, sync_every: int) -> Tensor:
    """generate's greedy / sampling loop: rows that end between two syncs run on, masked to pad."""
    pad = model.config.pad_token_id
    d = _Rows(model, input_ids, attention_mask, cfg, generator, decode_mode)
    out = torch.full((len(d.rows), cfg.max_new_tokens), pad, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(len(d.rows), dtype=torch.bool, device=out.device)  # per current row
    width = torch.zeros((), dtype=torch.long, device=out.device)  # steps until the last row ended
    for t in range(cfg.max_new_tokens):
        token = torch.where(done, pad, d.next(t))
        out[d.rows, t] = token
        width = torch.where(done.all(), width, t + 1)
        done = done | (token == d.eos)
        if t % sync_every == sync_every - 1:
            alive = (~done).nonzero().squeeze(1)  # a host sync
            if len(alive) == 0:
                break
            if len(alive) < len(done):
                d.keep(alive)
                done = done[alive]
    return out[:, :int(width)]


class TextStream:
    """Incremental detokenization of one output row: `push(token)` returns the text it adds ("" while
    held back), `finish()` what is left when the row ends without EOS. Together the pieces are
    exactly `tok.decode(tokens)`.

    Each push decodes a short window, not the whole row (linear in the row's length, not
    quadratic): the tokens from `prefix` on, minus the text of those before `read` (vLLM's
    `detokenize_incrementally`). Why a window decodes as in context:
    - SentencePiece drops the leading space of the first piece, and of every piece while the text
      is still empty (`decode(["▁", "▁the"]) == "the"`): a window starts only where its first
      emitted tokens decode to some text on their own, and then the drop is the same in both;
    - byte pieces (SentencePiece's byte fallback, ByT5) can end inside a character: text ending in
      U+FFFD (or, for ByT5, which drops incomplete bytes, adding nothing) is held back, so a
      window starts on a character boundary;
    - `Tokenizer.decode` drops special tokens and decodes the runs between them apart: a special
      token ends the window (what is held back goes out) and the next run starts a new one. WordPiece
      decodes the whole row at once, joining the words on either side of a special token with a
      space, so there a special token stays inside the window, where it decodes to nothing.
    A run of tokens that decode to nothing alone (spaces-only pieces) widens the window until text
    follows."""

    def __init__(self, tok):
        self.tok, self.ids = tok, []
        self.prefix = self.read = 0  # the window: ids[prefix:]; ids[prefix:read] went out already
        self.prefix_text = ""  # decode(ids[prefix:read])

    def push(self, token: int) -> str:
        self.ids.append(token)
        if self.tok.is_special(token) and self.tok.kind != "wordpiece":
            piece = self.finish()
            self.prefix = self.read = len(self.ids)
            self.prefix_text = ""
            return piece
        text = self.tok.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or not text.startswith(self.prefix_text):
            return ""  # an incomplete character, or a rewrite of what went out: wait for more
        piece = text[len(self.prefix_text):]
        if piece:
            alone = self.tok.decode(self.ids[self.read:])
            if alone:  # the next window starts at the tokens going out now
                self.prefix, self.prefix_text = self.read, alone
            else:
                self.prefix_text = text
            self.read = len(self.ids)
        return piece

    def finish(self) -> str:
        """The text held back, incomplete characters included (decode keeps them as U+FFFD)."""
        text = self.tok.decode(self.ids[self.prefix:])
        piece = text[len(self.prefix_text):]
        self.prefix_text, self.read = text, len(self.ids)
        return piece


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

"""Beam search with the semantics of transformers 5.x `_beam_search` (generation/utils.py).

Per step and batch item: take the top 2*num_beams continuations of all beams; a continuation that
hits EOS or the length cap among the top num_beams ranks becomes a finished hypothesis scored
sum_logprobs / generated_len ** length_penalty (generated_len counts the new token); the best
num_beams that did not hit continue. `early_stopping` True stops a batch item once num_beams
hypotheses are finished; False / "never" keep going while the heuristic says a running beam could
still beat the worst finished one. Shapes: B batch, N beams, V vocab, M max_new_tokens.

`BeamSearch` holds the state and takes one step at a time; `beam_search` loops it over a decode
step of its own (`t5kit generate`), the serve scheduler beside its other rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.config import T5Config
from ..model.t5 import T5
from . import engine
from .generation import GenerationConfig, process

NEG = -1.0e9  # transformers' additive "impossible" score


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """Gather along dim 1: x (B, K, ...) by idx (B, J) -> (B, J, ...)."""
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]))


class BeamSearch:
    """Beam search's state for B items x N beams, advanced one token at a time: `beam_search` runs
    it to the end over its own decode step, and the serve scheduler steps it beside other rows,
    so both give the same hypotheses. After each `advance` the decode cache must follow `parent`
    (`select(parent, cross_too=False)`) and take `tokens` as its next input."""

    def __init__(self, cfg: GenerationConfig, batch: int, config: T5Config, device: torch.device):
        b, n, m = batch, cfg.num_beams, cfg.max_new_tokens
        self.cfg, self.b, self.n, self.m = cfg, b, n, m
        self.eos, self.pad = config.eos_token_id, config.pad_token_id
        self.running = torch.full((b, n, m), self.pad, dtype=torch.long, device=device)
        self.running_scores = torch.zeros(b, n, device=device)
        self.running_scores[:, 1:] = NEG  # all beams start identical: expand from beam 0 only
        self.seqs = self.running.clone()
        self.seq_len = torch.zeros(b, n, dtype=torch.long, device=device)
        self.scores = torch.full((b, n), NEG, device=device)
        self.finished = torch.zeros(b, n, dtype=torch.bool, device=device)
        self.improvable = torch.ones(b, 1, dtype=torch.bool, device=device)
        self.hits = torch.zeros(b, 2 * n, dtype=torch.bool, device=device)
        self.top_n = torch.arange(2 * n, device=device) < n  # only the top num_beams ranks may finish
        self.start = torch.full((b * n, 1), config.decoder_start_token_id, dtype=torch.long, device=device)
        self.tokens = self.start  # (B*N, 1) the next input of every beam
        self.t = 0  # steps taken

    def advance(self, logits: Tensor) -> Tensor:
        """logits (B*N, V) fp32 of every beam's next token -> parent (B*N,): the cache row each
        beam continues from. No host sync."""
        cfg, b, n, m, t = self.cfg, self.b, self.n, self.m, self.t
        dev = logits.device
        history = torch.cat([self.start, self.running[:, :, :t].reshape(b * n, t)], 1)
        logp = process(cfg, history, logits.log_softmax(-1), self.eos)
        v = logp.shape[-1]
        logp = (logp.view(b, n, v) + self.running_scores[:, :, None]).view(b, n * v)
        top_lp, top_idx = torch.topk(logp, 2 * n)  # (B, 2N)
        src = top_idx // v
        cand = _take(self.running, src)  # (B, 2N, M)
        cand[:, :, t] = top_idx % v
        hits = self.hits = (cand[:, :, t] == self.eos) | (t + 1 >= m)

        # beams that continue
        run_lp = top_lp + hits.float() * NEG
        keep = torch.topk(run_lp, n).indices  # (B, N)
        self.running, self.running_scores = _take(cand, keep), _take(run_lp, keep)
        parent = _take(src, keep) + torch.arange(b, device=dev)[:, None] * n  # rows in the cache

        # hypotheses that finish
        new = hits & self.top_n
        norm = top_lp / ((t + 1) ** cfg.length_penalty)
        full = self.finished.all(-1, keepdim=True) & (cfg.early_stopping is True)
        norm = norm + full.float() * NEG + (~self.improvable).float() * NEG + (~new).float() * NEG
        merged = torch.topk(torch.cat([self.scores, norm], 1), n).indices
        self.seqs = _take(torch.cat([self.seqs, cand], 1), merged)
        self.scores = _take(torch.cat([self.scores, norm], 1), merged)
        self.finished = _take(torch.cat([self.finished, new], 1), merged)
        self.seq_len = _take(torch.cat([self.seq_len, torch.full_like(norm, t + 1, dtype=torch.long)], 1), merged)

        # could a running beam still beat the worst finished one?
        lp = cfg.length_penalty
        best_len = m if (cfg.early_stopping == "never" and lp > 0) else t + 1
        best_running = self.running_scores[:, :1] / (best_len ** lp)
        worst = torch.where(self.finished, self.scores.min(1, keepdim=True).values, NEG)
        self.improvable = self.improvable & (best_running > worst).any(-1, keepdim=True)
        self.tokens = self.running[:, :, t].reshape(b * n, 1)
        self.t = t + 1
        return parent.view(-1)

    def stopped(self) -> Tensor:
        """() bool on the device: no later step can change the result (no running beam can beat a
        finished one, every item is full under early_stopping=True, or every candidate hit the end)."""
        full = self.finished.all() & (self.cfg.early_stopping is True)
        return ~self.improvable.any() | full | self.hits.all()

    def output(self) -> tuple[Tensor, Tensor]:
        """-> ids (B * num_return_sequences, M), best first per item, pad after each one's end, and
        their lengths (B * num_return_sequences,)."""
        r, m = self.cfg.num_return_sequences, self.m
        out, lengths = self.seqs[:, :r].reshape(self.b * r, m), self.seq_len[:, :r].reshape(self.b * r)
        after = torch.arange(m, device=out.device)[None] >= lengths[:, None]
        return out.masked_fill(after, self.pad), lengths


@torch.inference_mode()
def beam_search(model: T5, input_ids: Tensor, attention_mask: Tensor | None, cfg: GenerationConfig,
                decode_mode: str = "auto", sync_every: int | None = None) -> Tensor:
    """-> (B * num_return_sequences, <= M) ids, best first per item, padded with pad after EOS.

    The stop test runs every `sync_every` steps (default: every step on CPU, engine.SYNC_EVERY on GPU).
    Steps after the stop cannot change the result: by then every item holds num_beams finished
    hypotheses with real scores, and what later steps offer scores near NEG, so it never enters."""
    dev = input_ids.device
    search = BeamSearch(cfg, input_ids.shape[0], model.config, dev)
    step = engine.start(model, input_ids, attention_mask, cfg.num_beams, cfg.max_new_tokens, decode_mode)
    if sync_every is None:
        sync_every = 1 if dev.type == "cpu" else engine.SYNC_EVERY
    for t in range(cfg.max_new_tokens):
        parent = search.advance(step(search.tokens))
        if t % sync_every == sync_every - 1 and bool(search.stopped()):
            break
        step.select(parent, cross_too=False)
    out, lengths = search.output()
    return out[:, :int(lengths.max())]

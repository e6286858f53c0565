"""Beam search with the semantics of transformers 5.x `_beam_search` (generation/utils.py).

Per step and batch item: take the top 2*num_beams continuations of all beams; a continuation that
hits EOS or the length cap among the top num_beams ranks becomes a finished hypothesis scored
sum_logprobs / generated_len ** length_penalty (generated_len counts the new token); the best
num_beams that did not hit continue. `early_stopping` True stops a batch item once num_beams
hypotheses are finished; False / "never" keep going while the heuristic says a running beam could
still beat the worst finished one. Shapes: B batch, N beams, V vocab, M max_new_tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.t5 import T5
from . import engine
from .generation import GenerationConfig, process

NEG = -1.0e9  # transformers' additive "impossible" score


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """Gather along dim 1: x (B, K, ...) by idx (B, J) -> (B, J, ...)."""
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]))


@torch.inference_mode()
def beam_search(model: T5, input_ids: Tensor, attention_mask: Tensor | None, cfg: GenerationConfig,
                decode_mode: str = "auto", sync_every: int | None = None) -> Tensor:
    """-> (B * num_return_sequences, <= M) ids, best first per item, padded with pad after EOS.

    The stop test runs every `sync_every` steps (default: every step on CPU, engine.SYNC_EVERY on GPU).
    Steps after the stop cannot change the result: by then every item holds num_beams finished
    hypotheses with real scores, and what later steps offer scores near NEG, so it never enters."""
    c = model.config
    b, n, m, dev = input_ids.shape[0], cfg.num_beams, cfg.max_new_tokens, input_ids.device
    lp = cfg.length_penalty
    step = engine.start(model, input_ids, attention_mask, n, m, decode_mode)
    if sync_every is None:
        sync_every = 1 if dev.type == "cpu" else engine.SYNC_EVERY
    running = torch.full((b, n, m), c.pad_token_id, dtype=torch.long, device=dev)
    running_scores = torch.zeros(b, n, device=dev)
    running_scores[:, 1:] = NEG  # all beams start identical: expand from beam 0 only
    seqs = running.clone()
    seq_len = torch.zeros(b, n, dtype=torch.long, device=dev)
    scores = torch.full((b, n), NEG, device=dev)
    finished = torch.zeros(b, n, dtype=torch.bool, device=dev)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=dev)
    top_n = torch.arange(2 * n, device=dev) < n  # only the top num_beams ranks may finish
    start = torch.full((b * n, 1), c.decoder_start_token_id, dtype=torch.long, device=dev)
    tokens = start
    for t in range(m):
        history = torch.cat([start, running[:, :, :t].reshape(b * n, t)], 1)
        logp = process(cfg, history, step(tokens).log_softmax(-1), c.eos_token_id)
        v = logp.shape[-1]
        logp = (logp.view(b, n, v) + running_scores[:, :, None]).view(b, n * v)
        top_lp, top_idx = torch.topk(logp, 2 * n)  # (B, 2N)
        src = top_idx // v
        cand = _take(running, src)  # (B, 2N, M)
        cand[:, :, t] = top_idx % v
        hits = (cand[:, :, t] == c.eos_token_id) | (t + 1 >= m)

        # beams that continue
        run_lp = top_lp + hits.float() * NEG
        keep = torch.topk(run_lp, n).indices  # (B, N)
        running, running_scores = _take(cand, keep), _take(run_lp, keep)
        parent = _take(src, keep) + torch.arange(b, device=dev)[:, None] * n  # rows in the cache

        # hypotheses that finish
        new = hits & top_n
        norm = top_lp / ((t + 1) ** lp)
        full = finished.all(-1, keepdim=True) & (cfg.early_stopping is True)
        norm = norm + full.float() * NEG + (~improvable).float() * NEG + (~new).float() * NEG
        merged = torch.topk(torch.cat([scores, norm], 1), n).indices
        seqs = _take(torch.cat([seqs, cand], 1), merged)
        scores = _take(torch.cat([scores, norm], 1), merged)
        finished = _take(torch.cat([finished, new], 1), merged)
        seq_len = _take(torch.cat([seq_len, torch.full_like(norm, t + 1, dtype=torch.long)], 1), merged)

        # could a running beam still beat the worst finished one?
        best_len = m if (cfg.early_stopping == "never" and lp > 0) else t + 1
        best_running = running_scores[:, :1] / (best_len ** lp)
        worst = torch.where(finished, scores.min(1, keepdim=True).values, NEG)
        improvable = improvable & (best_running > worst).any(-1, keepdim=True)
        if t % sync_every == sync_every - 1 and (
                not improvable.any() or (finished.all() and cfg.early_stopping is True) or hits.all()):
            break
        step.select(parent.view(-1), cross_too=False)
        tokens = running[:, :, t].reshape(b * n, 1)

    r = cfg.num_return_sequences
    out, lengths = seqs[:, :r].reshape(b * r, m), seq_len[:, :r].reshape(b * r)
    width = int(lengths.max())
    out = out[:, :width]
    return out.masked_fill(torch.arange(width, device=dev)[None] >= lengths[:, None], c.pad_token_id)


"""The loss of a training step: summed token cross-entropy with optional z-loss (t5x) and label
smoothing, the number of target tokens and the number predicted correctly (`loss_terms`), computed
two ways with the same sums: over logits split by vocabulary under tensor parallelism
(`_terms_vocab_parallel`, DTensor `loss_parallel`), or over plain logits a chunk of rows at a time
(`_terms_chunked` and its autograd Function `TokenStats`, the per-token statistics).

Separate from loop.py because it is its own concept with its own numerics (fp32 reads, chunking,
a hand-written backward) and its own users: the loop and its evaluation, the demo's timed steps,
the benchmarks and the tests call `loss_terms` without the loop's scheduling, logging and
checkpointing around it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import parallel


def loss_terms(model, batch: dict, z_loss: float = 0.0,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (summed token CE [+ z-loss], number of target tokens, number correct)."""
    mask = batch["input_ids"] != 0
    logits = model(batch["input_ids"], batch["decoder_input_ids"], mask, segment_ids=batch.get("segment_ids"),
                   decoder_segment_ids=batch.get("decoder_segment_ids"))  # (B, T, V)
    labels = batch["labels"].flatten()
    from torch.distributed.tensor import DTensor
    terms = _terms_vocab_parallel if isinstance(logits, DTensor) else _terms_chunked
    return terms(logits.flatten(0, 1), labels, z_loss, label_smoothing)


def _combine(nll, smooth, log_z, valid, correct, z_loss, label_smoothing):
    """The loss sum from per-token terms, (B*T,) each, nll 0 where ignored."""
    loss = nll.sum()
    if label_smoothing:  # torch's cross_entropy(label_smoothing=e): (1 - e) NLL + e * mean over V of -log p
        loss = (1 - label_smoothing) * loss - label_smoothing * smooth[valid].sum()
    if z_loss:  # t5x: z_loss * log(Z)^2 per target token
        loss = loss + z_loss * (log_z[valid] ** 2).sum()
    return loss, valid.sum(), (valid & correct).sum()


def _terms_vocab_parallel(logits, labels, z_loss: float, label_smoothing: float):
    """loss_terms over (B*T, V) logits split by vocabulary (tensor parallelism), written over
    log-probabilities and maxima along the vocabulary only, so that no gather is needed: every
    vocabulary reduction is a small all-reduce (DTensor `loss_parallel`). The per-token terms are
    then plain (B*T,) tensors. Materialises fp32 logits and log-probabilities whole."""
    logits = logits.float()
    valid = labels != -100
    logp = F.log_softmax(logits, -1)  # (B*T, V)
    nll = parallel.local(F.nll_loss(logp, labels, ignore_index=-100, reduction="none"))  # 0 where ignored
    best = parallel.local(logp.max(-1).values)  # the argmax's log-prob: log p(label) equals it iff correct
    smooth = parallel.local(logp.mean(-1)) if label_smoothing else None
    log_z = parallel.local(logits.max(-1).values) - best if z_loss else None  # logsumexp
    return _combine(nll, smooth, log_z, valid, -nll == best, z_loss, label_smoothing)


def _terms_chunked(logits, labels, z_loss: float, label_smoothing: float, rows: int | None = None):
    """loss_terms over plain (B*T, V) logits, the same sums as `_terms_vocab_parallel` without
    materialising fp32 logits or log-probabilities whole: `TokenStats` reads the logits (kept in
    their own dtype, bf16 under autocast) `rows` at a time in fp32, forward and backward
    (Liger-Kernel's chunked cross-entropy, without its fusion of the LM head)."""
    valid = labels != -100
    lse, picked, mean, top = TokenStats.apply(logits, labels.clamp(min=0), rows or _chunk_rows(logits.shape[-1]))
    nll = torch.where(valid, lse - picked, 0.0)  # -log p(label), 0 where ignored
    return _combine(nll, mean - lse, lse, valid, picked == top, z_loss, label_smoothing)


def _chunk_rows(vocab: int) -> int:
    """Rows per chunk: about 2**24 fp32 values (64 MiB) at a time."""
    return max(1, 2 ** 24 // vocab)


class TokenStats(torch.autograd.Function):
    """(N, V) logits, (N,) labels in [0, V) -> four (N,) fp32 vectors: logsumexp, the label's
    logit, the mean logit and the largest logit, computed `rows` rows at a time in fp32. With
    p = softmax(x), their gradients are p, onehot(label), 1/V and none (the maximum only decides
    correctness); backward recomputes p per chunk and writes one gradient in the logits' dtype."""

    @staticmethod
    def forward(ctx, logits, labels, rows: int):
        out = []
        for x, y in zip(logits.split(rows), labels.split(rows)):
            x = x.float()  # (rows, V)
            out.append(torch.stack([torch.logsumexp(x, -1), x.gather(-1, y[:, None])[:, 0], x.mean(-1),
                                    x.amax(-1)]))  # (4, rows)
        lse, picked, mean, top = torch.cat(out, 1)  # 4 x (N,)
        ctx.save_for_backward(logits, labels, lse)
        ctx.rows = rows
        ctx.mark_non_differentiable(top)
        return lse, picked, mean, top

    @staticmethod
    def backward(ctx, g_lse, g_picked, g_mean, _):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        v = logits.shape[-1]
        for i in range(0, logits.shape[0], ctx.rows):
            s = slice(i, i + ctx.rows)
            # one fp32 (rows, V) buffer, updated in place: each extra temporary is a pass over memory
            g = torch.sub(logits[s].float(), lse[s, None]).exp_().mul_(g_lse[s, None]).add_(g_mean[s, None] / v)
            g.scatter_add_(-1, labels[s, None], g_picked[s, None])
            grad[s] = g
        return grad, None, None

"""LongT5's encoder self-attention (Guo et al. 2022, "LongT5: Efficient Text-To-Text Transformer for
Long Sequences"): local and transient-global, exactly as transformers' modeling_longt5.py computes
them (the oracle; ../shared/T5_REFERENCE.md, "LongT5"), without its dense intermediates. Only the
encoder changes; the decoder is T5's. t5.py's EncoderBlock picks LongAttention for model_type
"longt5" and its Encoder builds one LongBias per forward (`stack_bias`), which every block reuses.

Shape legend as t5.py (B batch, S source length, H heads, D head size, C d_model), and
  R local_radius, L = R + 1 the block length, N = ceil(S / L) blocks of L tokens,
  G = S // global_block_size global tokens, W = 3L + G the keys of one query block.

What a token i attends (transformers' semantics):
- local: every token j with |j - i| <= R, padding excluded, with the bias rel[bucket(j - i)] from
  layer 0's `relative_attention_bias`, T5's bidirectional buckets (`LongT5LocalAttention`).
- transient global ("transient-global" only): token j belongs to global block id(j) =
  floor(j / global_block_size); padding has id -1 and a partial last block joins the one before it
  (`_make_global_fixed_block_ids`). Global token g is the sum of its block's normed hidden states,
  normed by the layer's own `global_input_layer_norm` and projected by the layer's k and v
  (`_create_global_aggregates`). Token i attends global g when g <= the largest id of its row, with
  the bias glob[bucket(g - id(i))] from layer 0's `global_relative_attention_bias`.

transformers builds it all densely: each key/value block copied 3 times, the global keys copied
once per block, a (B, H, S, G) side bias and (B, N, H, L, W) scores, so its memory grows with S^2/16
(issue 20). Here no tensor grows faster than S, the scores included:
- SDPA (CPU, and wherever FlexAttention cannot run: dropout, gradients on CPU, odd head sizes): a
  few query blocks at a time, each block's L queries attending its W keys (its 3-block window and
  the globals), with a (chunk, H, L, W) bias built for the chunk from per-distance vectors.
- FlexAttention (CUDA): one call over the keys [tokens | globals], the band and the global columns
  as a BlockMask built from the block arithmetic (no (S, S) mask is ever evaluated), the biases read
  in score_mod from the per-distance vectors (H, 2R + 1) local and (H, 2G + 1) global.
Padding queries' outputs differ from transformers' (they reach no real token, nor a loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import attend
from .config import T5Config
from .t5 import Attention, RelativeBias, RMSNorm

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from .t5 import Encoder

CHUNK_SCORES = 2**24  # SDPA path: query blocks per call so that B x chunk x H x L x W stays under this
# SDPA path: chunk biases (the same in every layer) kept for the next layers up to this many bytes
# per forward; the others are rebuilt in each layer. Bounded, so memory stays linear in S.
BIAS_CACHE_BYTES = 256 * 2**20
FLEX_BLOCK = 128  # FlexAttention's block size (its default), queries and keys


class LongAttention(Attention):
    """T5 attention with LongT5's parts: in transient-global layers a norm for the global tokens
    (HF `global_input_layer_norm`, every layer) and, in layer 0, the global bias table (HF
    `global_relative_attention_bias`); the local bias table is the block's `rel_bias`, as in T5."""

    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__(cfg)
        self.radius, self.global_block_size = cfg.local_radius, cfg.global_block_size
        self.global_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon) if cfg.transient_global else None
        self.global_bias = RelativeBias(cfg, bidirectional=True) if cfg.transient_global and has_bias else None

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], bias: LongBias) -> Tensor:
        """x (B, S, C) normed hidden states, kv their 2 x (B, H, S, D), bias the stack's -> (B, S, C)."""
        q = self.split(self.q(x))  # (B, H, S, D)
        gkv = None
        if self.global_norm is not None and bias.num_globals:  # (B, G, C) -> 2 x (B, H, G, D); none below G tokens
            gkv = self.project_kv(self.global_norm(global_sums(x, bias.block_ids, bias.num_globals)))
        if bias.flex is not None:
            out = _attend_flex(q, kv, gkv, bias.flex)
        else:
            out = _attend_blocks(q, kv, gkv, bias, self.dropout if self.training else 0.0)
        return self.o(out)  # (B, S, H*D) -> (B, S, C)


def global_block_ids(keep: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """keep (B, S) bool -> (ids (B, S) long, -1 for padding; valid (B, G) bool, G = S // size).

    transformers' `_make_global_fixed_block_ids`, its float32 arithmetic included: an id is the
    floor of a float32 running sum of 1/size (exact when size is a power of two; otherwise the sum's
    rounding, which is the device's, decides, so it is done the same way). Tokens after the last
    full block join it; a row with fewer than `size` tokens has no global token at all.

    >>> ids, valid = global_block_ids(torch.tensor([[True] * 7 + [False]]), 3)
    >>> ids.tolist(), valid.tolist()
    ([[0, 0, 0, 1, 1, 1, 1, -1]], [[True, True]])
    """
    b, s = keep.shape
    step = torch.ones(b, s, device=keep.device) / size
    fixed = torch.cumsum(step, dim=1) - step  # (B, S) ~ i / size, in float32
    ids = torch.floor(torch.where(keep, 1.0, -1000.0) + fixed - 1.0).long().clamp(min=-1)
    ids = torch.where(keep, ids, -1)
    ends = (torch.arange(s, device=keep.device) % size == size - 1) & (ids >= 0)
    ids = torch.minimum(ids, ends.sum(-1, keepdim=True) - 1)  # orphans join the last full block
    valid = torch.arange(s // size, device=keep.device) <= ids.max(-1, keepdim=True).values  # (B, G)
    return ids, valid


def global_sums(x: Tensor, ids: Tensor, g: int) -> Tensor:
    """x (B, S, C), ids (B, S) -> (B, G, C): the sum of each global block's rows (padding, id -1,
    goes nowhere), summed in fp32 (transformers: an einsum with a one-hot (B, S, G) matrix)."""
    b, s, c = x.shape
    slot = torch.where(ids >= 0, ids, g)[..., None].expand(b, s, c)  # padding into a spare row G
    sums = torch.zeros(b, g + 1, c, dtype=torch.float32, device=x.device).scatter_add_(1, slot, x.float())
    return sums[:, :g].to(x.dtype)


def _by_distance(table: RelativeBias, dist: Tensor) -> Tensor:
    """The (H,) bias of each key-minus-query distance in dist (n,) -> (H, n); T5's bucketing."""
    zero = torch.zeros(1, 1, dtype=dist.dtype, device=dist.device)
    return table(zero, dist[None])[0, :, 0]  # (1, H, 1, n) -> (H, n)


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class LongBias:
    """What every block of one LongT5 encoder forward shares: keep (B, S) bool tokens; local (H,
    2R + 1) the bias of distances -R..R; for transient-global, block_ids (B, S), global_keep (B, G)
    and side (H, 2G + 1) the bias of global-minus-block distances -G..G. One of: window (H, L, 3L),
    a query block's bias over its 3-block window, out-of-band keys at finfo.min (SDPA path); flex,
    the FlexAttention path's mask and score_mod."""

    keep: Tensor
    radius: int
    local: Tensor
    block_ids: Tensor | None = None
    global_keep: Tensor | None = None
    side: Tensor | None = None
    window: Tensor | None = None
    flex: FlexLong | None = None
    chunks: dict = field(default_factory=dict)  # SDPA path: chunk start -> its bias, kept across layers
    scratch: list = field(default_factory=list)  # SDPA path without gradients: the buffers every layer reuses

    @property
    def num_globals(self) -> int:
        return 0 if self.global_keep is None else self.global_keep.shape[1]


def stack_bias(encoder: Encoder, x: Tensor, attention_mask: Tensor | None, segment_ids: Tensor | None) -> LongBias:
    """The LongBias of one forward of `encoder` (its blocks are EncoderBlocks with LongAttention)
    on x (B, S, C), from layer 0's tables. segment_ids: a row may hold one example only."""
    b, s, _ = x.shape
    if segment_ids is not None:
        if bool((segment_ids > 1).any()):
            raise ValueError("LongT5 encodes one example per row (as transformers does): packed rows (segment "
                             "ids > 1) are not supported; fine-tune without --pack")
        keep = segment_ids != 0
    else:
        keep = torch.ones(b, s, dtype=torch.bool, device=x.device) if attention_mask is None else attention_mask != 0
    first = encoder.blocks[0]
    attn, r = first.attn, first.attn.radius
    local = _by_distance(first.rel_bias, torch.arange(-r, r + 1, device=x.device)).to(x.dtype)  # (H, 2R + 1)
    ids = valid = side = None
    if attn.global_norm is not None:
        ids, valid = global_block_ids(keep, attn.global_block_size)
        g = valid.shape[1]
        side = _by_distance(attn.global_bias, torch.arange(-g, g + 1, device=x.device)).to(x.dtype)  # (H, 2G + 1)
    if encoder.use_flex(x):
        return LongBias(keep, r, local, ids, valid, side, flex=_flex_bias(keep, r, local, ids, valid, side))
    n = r + 1
    dist = torch.arange(3 * n, device=x.device)[None] - n - torch.arange(n, device=x.device)[:, None]  # (L, 3L)
    window = local[:, dist.clamp(-r, r) + r].masked_fill(dist.abs() > r, torch.finfo(x.dtype).min)  # (H, L, 3L)
    return LongBias(keep, r, local, ids, valid, side, window=window)


def _attend_blocks(q: Tensor, kv: tuple[Tensor, Tensor], gkv: tuple[Tensor, Tensor] | None, bias: LongBias,
                   dropout_p: float) -> Tensor:
    """The SDPA path. q, kv (B, H, S, D), gkv 2 x (B, H, G, D) -> (B, S, H*D).

    Query block n (tokens nL .. nL + L - 1) attends key blocks n - 1, n, n + 1 (zeros beyond the
    ends, masked) and the G globals: W keys, as transformers lays them out. A chunk of c blocks is
    one attention.attend (SDPA) call over c x B rows (chunk-major). Its keys, values and bias are
    written into buffers, reused from chunk to chunk and layer to layer without gradients (a fresh
    CPU tensor costs its page faults); the bias is laid out (H, c x B, L, W), which SDPA reads
    through a transposed view, so the global part is one gather: query i's row is
    side[:, G - id(i) : 2G - id(i)]."""
    b, h, s, d = q.shape
    n = bias.radius + 1
    blocks, g = -(-s // n), bias.num_globals
    w = 3 * n + g
    fill = torch.finfo(q.dtype).min
    qb = F.pad(q, (0, 0, 0, blocks * n - s)).view(b, h, blocks, n, d)  # (B, H, N, L, D)
    # every block's 3-block window, as views: (B, H, N + 2 blocks, D) -> (B, H, N, D, 3L)
    kw, vw = (F.pad(t, (0, 0, n, (blocks + 1) * n - s)).unfold(2, 3 * n, n) for t in kv)
    keepw = F.pad(bias.keep, (n, (blocks + 1) * n - s)).unfold(1, 3 * n, n)  # (B, N, 3L)
    if gkv is not None:
        rows = bias.side.unfold(1, g, 1)  # (H, G + 2, G): rows[:, j] = side[:, j : j + G]
        first = g - F.pad(bias.block_ids, (0, blocks * n - s), value=-1).view(b, blocks, n)  # (B, N, L), in 1..G+1
        global_all = bool(bias.global_keep.all())
    step = max(1, CHUNK_SCORES // (b * h * n * w))

    def buffers(c: int) -> tuple[Tensor, Tensor, Tensor]:  # (H, c, B, L, W) bias; 2 x (c, B, H, W, D)
        return q.new_empty(h, c, b, n, w), q.new_empty(c, b, h, w, d), q.new_empty(c, b, h, w, d)

    reuse = None
    if not torch.is_grad_enabled():
        if not bias.scratch:
            bias.scratch.extend([*buffers(min(step, blocks)), q.new_empty(b, blocks * n, h * d)])
        *reuse, out = bias.scratch
    else:
        out = q.new_empty(b, blocks * n, h * d)  # (B, N*L, H*D)
    for c0 in range(0, blocks, step):
        c1 = min(blocks, c0 + step)
        c = c1 - c0
        mask, keys, values = (t[:, :c] if i == 0 else t[:c] for i, t in enumerate(reuse)) if reuse else buffers(c)
        if c0 in bias.chunks:
            mask = bias.chunks[c0]
        else:
            if mask.numel() * mask.element_size() * (len(bias.chunks) + 1) <= BIAS_CACHE_BYTES:
                mask = bias.chunks.setdefault(c0, torch.empty_like(mask))
            mask[..., :3 * n] = bias.window[:, None, None]
            kept = keepw[:, c0:c1].transpose(0, 1)  # (c, B, 3L)
            if not bool(kept.all()):  # the sequence's two ends, and padding
                mask[..., :3 * n].masked_fill_(~kept[None, :, :, None], fill)
            if gkv is not None:
                mask[..., 3 * n:] = rows[:, first[:, c0:c1].transpose(0, 1)]  # (H, c, B, L, G)
                if not global_all:
                    mask[..., 3 * n:].masked_fill_(~bias.global_keep[None, None, :, None], fill)
        keys[..., :3 * n, :] = kw[:, :, c0:c1].permute(2, 0, 1, 4, 3)  # (c, B, H, 3L, D)
        values[..., :3 * n, :] = vw[:, :, c0:c1].permute(2, 0, 1, 4, 3)
        if gkv is not None:
            keys[..., 3 * n:, :] = gkv[0][None]
            values[..., 3 * n:, :] = gkv[1][None]
        qc = qb[:, :, c0:c1].permute(2, 0, 1, 3, 4).reshape(c * b, h, n, d)  # (c*B, H, L, D)
        o = attend(qc, keys.view(c * b, h, w, d), values.view(c * b, h, w, d),
                   mask.view(h, c * b, n, w).transpose(0, 1), dropout_p=dropout_p)  # (c*B, H, L, D)
        out[:, c0 * n:c1 * n].view(b, c, n, h, d).copy_(o.view(c, b, h, n, d).permute(1, 0, 3, 2, 4))
    return out[:, :s]  # (B, S, H*D)


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class FlexLong:
    """The FlexAttention path's bias, as attention.attend takes one (`block_mask`, `score_mod`).
    Keys are [S tokens, zero-padded to a multiple of FLEX_BLOCK | G globals]: the globals start on
    a block boundary, so the block mask's global columns are whole blocks."""

    block_mask: BlockMask
    keep: Tensor
    radius: int
    local: Tensor
    block_ids: Tensor | None
    global_keep: Tensor | None
    side: Tensor | None

    def score_mod(self, heads: int) -> Callable:
        local, r = self.local, self.radius
        if local.shape[0] != heads:
            raise ValueError(f"LongT5 FlexAttention: the bias has {local.shape[0]} heads, the attention {heads}")
        if self.side is None or not self.global_keep.shape[1]:  # local, or fewer tokens than a global block
            def add_local(score, b, h, q_idx, kv_idx):
                return score + local[h, (kv_idx - q_idx).clamp(-r, r) + r]
            return add_local
        ids, side, start, g = self.block_ids, self.side, _padded(self.keep.shape[1]), self.global_keep.shape[1]

        def add_local_or_global(score, b, h, q_idx, kv_idx):
            near = local[h, (kv_idx - q_idx).clamp(-r, r) + r]
            far = side[h, (kv_idx - start - ids[b, q_idx]).clamp(-g, g) + g]
            return score + torch.where(kv_idx < start, near, far)
        return add_local_or_global


def _padded(s: int) -> int:
    return -(-s // FLEX_BLOCK) * FLEX_BLOCK


def _flex_bias(keep: Tensor, r: int, local: Tensor, ids: Tensor | None, valid: Tensor | None,
               side: Tensor | None) -> FlexLong:
    """FlexLong for keys [tokens | globals]. Its BlockMask is built from the block arithmetic with
    BlockMask.from_kv_blocks (PyTorch docs, "BlockMask"): query block i keeps the key blocks that
    meet the band [iQ - R, iQ + Q - 1 + R] and every global block, (1, 1, S/Q, K/Q) block flags
    broadcast over the batch; create_block_mask would evaluate the mask on every (query, key) pair,
    an (S, S + G) tensor. Every kept block is partial: mask_mod (band, padding, valid globals) runs
    on all of them."""
    from torch.nn.attention.flex_attention import BlockMask

    s = keep.shape[1]
    g = 0 if valid is None else valid.shape[1]
    start = _padded(s) if g else s  # the first global key
    nq, nkv = -(-s // FLEX_BLOCK), -(-(start + g) // FLEX_BLOCK)
    q0 = torch.arange(nq)[:, None] * FLEX_BLOCK  # (nq, 1) first query of each block
    k0 = torch.arange(nkv)[None] * FLEX_BLOCK  # (1, nkv) first key of each block
    kept = (k0 <= (q0 + FLEX_BLOCK - 1 + r).clamp(max=s - 1)) & (k0 + FLEX_BLOCK - 1 >= q0 - r)
    kept |= k0 >= start  # (nq, nkv); no global block when g == 0 (start + g == s)
    order = torch.argsort((~kept).int(), dim=-1, stable=True)  # kept blocks first, in key order
    last = s - 1

    def mask_mod(b, h, q_idx, kv_idx):
        near = ((kv_idx - q_idx).abs() <= r) & (kv_idx < s) & keep[b, kv_idx.clamp(max=last)]
        if g == 0:
            return near
        return near | ((kv_idx >= start) & valid[b, (kv_idx - start).clamp(0, g - 1)])

    device = keep.device
    block_mask = BlockMask.from_kv_blocks(
        kept.sum(-1).int()[None, None].to(device), order.int()[None, None].to(device),
        BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(s, start + g))
    return FlexLong(block_mask, keep, r, local, ids, valid, side)


def _attend_flex(q: Tensor, kv: tuple[Tensor, Tensor], gkv: tuple[Tensor, Tensor] | None, flex: FlexLong) -> Tensor:
    """The FlexAttention path. q, kv (B, H, S, D), gkv 2 x (B, H, G, D) -> (B, S, H*D)."""
    b, h, s, d = q.shape
    k, v = kv
    if gkv is not None:
        pad = _padded(s) - s
        k, v = (torch.cat([F.pad(t, (0, 0, 0, pad)), gt], dim=2) for t, gt in zip(kv, gkv))  # (B, H, S' + G, D)
    return attend(q, k, v, flex).transpose(1, 2).reshape(b, s, h * d)

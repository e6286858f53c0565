"""DecodeCache: the decoder's state between incremental decode steps (self-attention K/V, cross
K/V, the causal relative bias, each row's position), and how rows of it are reordered, joined and
cut (beam search, continuous batching). Its own module: the model (t5.py) only reads it in a step,
while inference/engine.py and serving/scheduler.py build, move and join it.

Shape legend as t5.py (B batch, S source length, L cache length, H heads, D head size).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import mask_bias

if TYPE_CHECKING:
    from .t5 import Decoder


class DecodeCache:
    """Static decoder state for incremental decoding, one token per step. Every step has the same
    shapes whatever the position (so it can be compiled and captured in a CUDA graph, engine.py):
    self-attention K/V are preallocated to `max_len` and attended in full, the keys not written yet
    masked by the causal bias; each row keeps its own position in a device tensor (rows may be at
    different positions: continuous batching). Cross-attention K/V are computed once per request;
    the relative bias once per distance back from the query (0 .. max_len - 1), each row's line
    gathered per step with the causal mask: O(L) per table, where an (L, L) table took 0.5 s and
    288 MB for a t5-small request of 3,000 new tokens, a stall for every row `serve` runs beside
    it (issue 17).

    self_kv: per layer 2 x (B, H, L, D); cross_kv: per layer 2 x (B, H, S, D);
    cross_bias (B, 1, 1, S); self_bias: one (H, L) per table, [:, j] the bias of a key j positions
    before the query, and bias_of_layer the table of each layer; pos (B,) tokens written so far per row."""

    def __init__(self, decoder: "Decoder", memory: Tensor, memory_mask: Tensor | None, max_len: int):
        b, s, _ = memory.shape
        self.cross_kv = [blk.cross.project_kv(memory) for blk in decoder.blocks]
        # heads as projected, not config.num_heads: the local share when split by head (tensor parallelism)
        h, d = self.cross_kv[0][0].shape[1], self.cross_kv[0][0].shape[3]
        keep = (memory_mask if memory_mask is not None else memory.new_ones(b, s))[:, None, :].bool()
        self.cross_bias = mask_bias(keep, memory.dtype)
        self.self_kv = [(memory.new_zeros(b, h, max_len, d), memory.new_zeros(b, h, max_len, d))
                        for _ in decoder.blocks]
        # a query at position L - 1 over keys 0 .. L - 1 meets every distance back, j = L - 1 - key
        last = torch.full((1, 1), max_len - 1, device=memory.device)
        keys = torch.arange(max_len, device=memory.device)[None]
        no_mask = memory.new_zeros(1, 1, 1, max_len)
        biases = decoder.position_biases(last, keys, no_mask)  # (1, H, 1, L); one tensor per table
        index: dict[int, int] = {}
        self.bias_of_layer = [index.setdefault(id(b), len(index)) for b in biases]
        self.self_bias = [b[0, :, 0].flip(-1) for b in {id(b): b for b in biases}.values()]  # (H, L) by j
        self.pos = torch.zeros(b, dtype=torch.long, device=memory.device)
        self.spare_kv: list[tuple[Tensor, Tensor]] | None = None  # select() gathers into these
        self.max_len = max_len

    def step_biases(self) -> list[Tensor]:
        """Per layer, each row's bias at its position: (B, H, 1, L), gathered once per table; keys
        after the row's position (not written yet) at finfo.min, as mask_bias gives (the sum of
        the relative bias and finfo.min that an (L, L) table held rounds to finfo.min in fp32 and
        bf16)."""
        back = self.pos[:, None] - torch.arange(self.max_len, device=self.pos.device)  # (B, L): j of each key
        future = back < 0
        fill = torch.finfo(self.cross_bias.dtype).min
        rows = [bias[:, back.clamp(min=0)].masked_fill(future, fill).transpose(0, 1)[:, :, None]
                for bias in self.self_bias]  # (H, B, L) -> (B, H, 1, L)
        return [rows[i] for i in self.bias_of_layer]

    def write(self, layer: int, kv: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Store one new key/value per row (B, H, 1, D) at the row's position; return the whole
        (B, H, L, D) cache (unwritten slots are masked by the step bias)."""
        if kv[0].shape[2] != 1:
            raise ValueError(f"the decode cache takes one token per step, got {kv[0].shape[2]}")
        k, v = self.self_kv[layer]
        rows = torch.arange(k.shape[0], device=k.device)
        k[rows, :, self.pos] = kv[0][:, :, 0]  # (B, H, D) at (row, :, pos[row])
        v[rows, :, self.pos] = kv[1][:, :, 0]
        return k, v

    def advance(self) -> None:
        """After a step: every row moved one position (in place, so a captured graph sees it)."""
        self.pos.add_(1)

    def select(self, rows: Tensor, cross_too: bool = True) -> None:
        """Keep / reorder batch rows: beam reordering (self only) or dropping finished rows. The
        self-attention K/V are gathered into the previous step's buffers when the row count is
        unchanged (beams): a fresh tensor each step cost 7x the copy on CPU (new pages each time)."""
        spare = self.spare_kv
        if spare is None or spare[0][0].shape != (rows.shape[0], *self.self_kv[0][0].shape[1:]):
            spare = [(None, None)] * len(self.self_kv)
        self.spare_kv = self.self_kv
        self.self_kv = [(torch.index_select(k, 0, rows, out=sk), torch.index_select(v, 0, rows, out=sv))
                        for (k, v), (sk, sv) in zip(self.self_kv, spare)]
        self.pos = self.pos.index_select(0, rows)
        if cross_too:
            self.cross_kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.cross_kv]
            self.cross_bias = self.cross_bias.index_select(0, rows)

    @staticmethod
    def cat(caches: list["DecodeCache"]) -> "DecodeCache":
        """The rows of several caches as one batch, in order (continuous batching: requests at
        different steps share a decode step). Cross K/V are padded to the longest source with keys
        masked (exactly zero weight), self K/V to the longest max_len with zeros, which each row's
        causal bias hides; the longest relative bias serves all, since a shorter one is its first
        distances (the bias depends on the distance only)."""
        s = max(c.cross_bias.shape[-1] for c in caches)
        longest = max(caches, key=lambda c: c.max_len)
        fill = torch.finfo(caches[0].cross_bias.dtype).min
        return longest._like(
            [tuple(torch.cat([_pad_dim(c.self_kv[i][j], 2, longest.max_len) for c in caches]) for j in (0, 1))
             for i in range(len(caches[0].self_kv))],
            [tuple(torch.cat([_pad_dim(c.cross_kv[i][j], 2, s) for c in caches]) for j in (0, 1))
             for i in range(len(caches[0].cross_kv))],
            torch.cat([_pad_dim(c.cross_bias, 3, s, fill) for c in caches]),  # (B, 1, 1, S)
            torch.cat([c.pos for c in caches]))

    def head(self, n: int) -> "DecodeCache":
        """The first n rows, as views (engine.py: a slot's state moving to a smaller slot)."""
        return self._like([(k[:n], v[:n]) for k, v in self.self_kv], [(k[:n], v[:n]) for k, v in self.cross_kv],
                          self.cross_bias[:n], self.pos[:n])

    def _like(self, self_kv, cross_kv, cross_bias: Tensor, pos: Tensor) -> "DecodeCache":
        """A cache over the given rows' tensors that shares this one's relative bias and length."""
        out = object.__new__(DecodeCache)
        out.self_kv, out.cross_kv, out.cross_bias, out.pos = self_kv, cross_kv, cross_bias, pos
        out.self_bias, out.bias_of_layer, out.max_len = self.self_bias, self.bias_of_layer, self.max_len
        out.spare_kv = None
        return out

    def truncate(self, max_len: int) -> None:
        """Shrink the self-attention cache to max_len positions (no row may write past them): the
        step attends the whole cache, so a long request that left should not slow the others."""
        if max_len < self.max_len:
            self.self_kv = [(k[:, :, :max_len], v[:, :, :max_len]) for k, v in self.self_kv]
            self.self_bias = [b[:, :max_len] for b in self.self_bias]
            self.max_len, self.spare_kv = max_len, None


def _pad_dim(x: Tensor, dim: int, size: int, value: float = 0.0) -> Tensor:
    """x padded at the end of `dim` to `size` with `value`."""
    if x.shape[dim] == size:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 1 - dim) + (0, size - x.shape[dim]), value=value)

"""The one-token decode step, eager or static: what greedy, sampling and beam search call per token.

`start(...)` runs the encoder once and returns a `Decoding`: call it with the last token of every
row to get fp32 next-token logits, `select` rows to drop finished ones or reorder beams.

- `Decoding` is the eager step over `model.DecodeCache` (its shapes never change with the
  position, only with the number of rows).
- `StaticDecoding` runs the same step over fixed buffers held in a `Slot`: the batch padded to a
  bucket (`BATCH_BUCKETS`), the source and the cache to multiples of `LENGTH_STEP`, so a few slots
  cover every request. A slot's step is either captured once in a CUDA graph and replayed (one
  launch per token instead of hundreds: on an H100 the eager t5-base step is bound by launches,
  17 ms, against 1.3 ms replayed) or compiled with `torch.compile`. Slots are kept per model (an
  LRU of `MAX_SLOTS`), so the capture is paid once per shape, not per call.

Static and eager agree to float rounding: the padded rows and keys are masked (their softmax
weight is exactly 0), and the padded batch rows never mix with real ones. Tests check greedy ids
and fp32 logits (1e-5) of the compiled twin against the eager step on CPU, and of the graph twin on
CUDA. After gpt-fast's CUDA-graph decoding and transformers' static cache.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
from torch import Tensor

from ..model.t5 import T5, DecodeCache

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LENGTH_STEP = 64  # source and cache lengths round up to a multiple: fewer slots, little waste
MAX_SLOTS = 8  # per model; each holds its cache buffers and one graph
SYNC_EVERY = 16  # on GPU, greedy / sampling / beam loops test for finished rows (a host sync) this often


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def batch_bucket(n: int) -> int:
    """Smallest bucket holding n rows (beyond the largest: the next multiple of it)."""
    return next((b for b in BATCH_BUCKETS if b >= n), round_up(n, BATCH_BUCKETS[-1]))


def static_mode(device: torch.device, mode: str) -> str:
    """"auto" -> "graph" on CUDA (launch-bound there), "eager" elsewhere (CPU kernels dominate)."""
    if mode not in ("auto", "eager", "graph", "compile"):
        raise ValueError(f"decode mode {mode!r}: expected auto, eager, graph or compile")
    if mode == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if mode == "graph" and device.type != "cuda":
        raise ValueError("decode mode 'graph' (CUDA graphs) needs a CUDA device")
    return mode


class Decoding:
    """The eager step: N rows, each at its own position in a DecodeCache."""

    def __init__(self, model: T5, cache: DecodeCache):
        self.model, self.cache = model, cache

    @property
    def rows(self) -> int:
        return self.cache.pos.shape[0]

    def __call__(self, tokens: Tensor) -> Tensor:
        """tokens (N, 1) -> fp32 logits (N, V) of the next token."""
        return self.model.logits(self.model.decode(tokens, cache=self.cache))[:, -1].float()

    def select(self, rows: Tensor, cross_too: bool = True) -> None:
        self.cache.select(rows, cross_too)


class Slot:
    """Fixed buffers for (batch, source length, cache length) and the step run over them."""

    def __init__(self, model: T5, batch: int, src_len: int, max_len: int, dtype: torch.dtype,
                 device: torch.device, mode: str):
        memory = torch.zeros(batch, src_len, model.config.d_model, dtype=dtype, device=device)
        self.mode = mode
        self.cache = DecodeCache(model.decoder, memory, None, max_len)
        self.eager = Decoding(model, self.cache)  # the step itself; the slot only fixes its buffers
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.logits: Tensor | None = None
        self.graph = None
        self.owner: weakref.ref | None = None  # the StaticDecoding using the buffers now
        self.fn = _compile(self._step, model, device) if mode == "compile" else self._step

    def _step(self) -> Tensor:
        return self.eager(self.tokens)

    def load(self, cache: DecodeCache) -> None:
        """Copy a request's state (n <= batch rows) into the buffers; padded rows and source
        positions are masked (rows: all keys kept, over zero K/V, so no NaN)."""
        n, s = cache.pos.shape[0], cache.cross_bias.shape[-1]
        fill = torch.finfo(self.cache.cross_bias.dtype).min
        self.cache.cross_bias.zero_()
        self.cache.cross_bias[:n].fill_(fill)
        self.cache.cross_bias[:n, ..., :s] = cache.cross_bias
        for (k, v), (ck, cv) in zip(self.cache.cross_kv, cache.cross_kv):
            k.zero_(), v.zero_()
            k[:n, :, :s], v[:n, :, :s] = ck, cv
        for (k, v), (sk, sv) in zip(self.cache.self_kv, cache.self_kv):
            k.zero_(), v.zero_()
            k[:n, :, :sk.shape[2]], v[:n, :, :sv.shape[2]] = sk, sv
        self.cache.pos.zero_()
        self.cache.pos[:n] = cache.pos

    def run(self, tokens: Tensor) -> Tensor:
        """tokens (n, 1) -> fp32 logits (n, V); the padded rows run too and are dropped."""
        n = tokens.shape[0]
        self.tokens[:n] = tokens
        if self.mode != "graph":
            return self.fn()[:n]
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits[:n]

    def _capture(self) -> None:
        """Warm up on a side stream (lazy CUDA init, cuBLAS workspaces), then capture one step.
        The step advances positions in place, so they are saved around warm-up and capture."""
        pos = self.cache.pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn()
                self.cache.pos.copy_(pos)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.fn()
        self.cache.pos.copy_(pos)

    def reorder(self, rows: Tensor, cross_too: bool) -> None:
        """Row i of the buffers becomes row rows[i] (n <= batch rows; the rest keep their place)."""
        idx = torch.arange(self.tokens.shape[0], device=rows.device)
        idx[:rows.shape[0]] = rows
        c = self.cache
        for k, v in c.self_kv + (c.cross_kv if cross_too else []):
            k.copy_(k.index_select(0, idx)), v.copy_(v.index_select(0, idx))
        c.pos.copy_(c.pos.index_select(0, idx))
        if cross_too:
            c.cross_bias.copy_(c.cross_bias.index_select(0, idx))


def _compile(step, model: T5, device: torch.device):
    """torch.compile of a slot's step. On CPU with inductor's freezing: the weights become
    constants that it packs into oneDNN's layout itself (measured: same ids as the eager packed
    step). Weights packed already by quantize.pack_linears cannot be compiled (inductor only
    lowers oneDNN linears over its own constants), so they are refused here with the fix."""
    if any(getattr(m, "onednn_packed", False) for m in model.modules()):
        raise ValueError("decode mode 'compile' takes the model's own weights, not quantize.pack_linears' "
                         "(on CPU, compiling packs them itself); load the model again without packing")
    options = {"freezing": True} if device.type == "cpu" else None
    return torch.compile(step, fullgraph=True, dynamic=False, options=options)


_SLOTS: "weakref.WeakKeyDictionary[T5, OrderedDict]" = weakref.WeakKeyDictionary()


def slot_for(user: "StaticDecoding", batch: int, src_len: int, max_len: int, dtype: torch.dtype,
             device: torch.device, mode: str) -> Slot:
    """The model's slot for these bucketed shapes, built on first use, least recently used out;
    owned by `user` until it moves on or is dropped. While another decoding (an unfinished
    stream) owns it, `user` gets a slot of its own that is not kept."""
    slots = _SLOTS.setdefault(user.model, OrderedDict())
    key = (batch, src_len, max_len, dtype, str(device), mode)
    slot = slots.get(key)
    if slot is None:
        while len(slots) >= MAX_SLOTS:
            slots.popitem(last=False)
        slot = slots[key] = Slot(user.model, batch, src_len, max_len, dtype, device, mode)
    elif slot.owner is not None and slot.owner() not in (None, user):
        slot = Slot(user.model, batch, src_len, max_len, dtype, device, mode)
    else:
        slots.move_to_end(key)
    slot.owner = weakref.ref(user)
    return slot


class StaticDecoding:
    """The step over a Slot's fixed buffers; n real rows in the first rows of the bucket. When
    finished rows leave and a smaller bucket fits, the state moves to that bucket's slot."""

    def __init__(self, model: T5, cache: DecodeCache, mode: str):
        self.model, self.mode = model, mode
        self.src_len = round_up(cache.cross_bias.shape[-1], LENGTH_STEP)
        self.max_len = round_up(cache.self_kv[0][0].shape[2], LENGTH_STEP)
        self.n = cache.pos.shape[0]
        self.slot = self._slot(self.n)
        self.slot.load(cache)

    def _slot(self, n: int) -> Slot:
        w = self.model.shared.weight
        return slot_for(self, batch_bucket(n), self.src_len, self.max_len, w.dtype, w.device, self.mode)

    @property
    def rows(self) -> int:
        return self.n

    def __call__(self, tokens: Tensor) -> Tensor:
        return self.slot.run(tokens)

    def select(self, rows: Tensor, cross_too: bool = True) -> None:
        self.slot.reorder(rows, cross_too)
        self.n = rows.shape[0]
        smaller = self._slot(self.n)
        if smaller is not self.slot:
            smaller.load(self.slot.cache.head(self.n))
            self.slot.owner, self.slot = None, smaller


def start(model: T5, input_ids: Tensor, attention_mask: Tensor | None, repeat: int, max_len: int,
          mode: str = "auto") -> Decoding | StaticDecoding:
    """Encode (B, S) once, repeat each row `repeat` times (beams, samples) and return the step.
    mode: "auto" (CUDA graphs on CUDA, eager elsewhere), "eager", "graph" or "compile"."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, length>0), got shape {tuple(input_ids.shape)}")
    mode = static_mode(input_ids.device, mode)
    memory = model.encode(input_ids, attention_mask)
    if repeat > 1:  # beams / samples share one encoder pass
        memory = memory.repeat_interleave(repeat, 0)
        attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(repeat, 0)
    cache = model.new_cache(memory, attention_mask, max_len)
    return Decoding(model, cache) if mode == "eager" else StaticDecoding(model, cache, mode)


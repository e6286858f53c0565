"""The one-token decode step, eager or static: what greedy, sampling and beam search call per token.

`start(...)` runs the encoder once and returns a `Decoding`: call it with the last token of every
row to get fp32 next-token logits, `select` rows to drop finished ones or reorder beams.

- `Decoding` is the eager step over `model/cache.DecodeCache` (its shapes never change with the
  position, only with the number of rows).
- `StaticDecoding` runs the same step over fixed buffers held in a `Slot`: the batch padded to a
  bucket (`BATCH_BUCKETS`), the source and the cache to multiples of `LENGTH_STEP`, so a few slots
  cover every request. A slot's step is either captured once in a CUDA graph and replayed (one
  launch per token instead of hundreds: on an H100 the eager t5-base step is bound by launches,
  17 ms, against 1.3 ms replayed) or compiled with `torch.compile`. Slots are kept per model (an
  LRU of `MAX_SLOTS`), so the capture is paid once per shape, not per call, and per state of the
  weights: a graph replays over the addresses it captured, so a slot built over weights that have
  moved since (`Module.to`, FSDP2 gathering them into new storage for each evaluation,
  `load_state_dict`, packing or quantizing) is built again (`weights_of`, issue 17). Slots hold no
  reference to their model: a model's slots go with it.

Static and eager agree to float rounding: the padded rows and keys are masked (their softmax
weight is exactly 0), and the padded batch rows never mix with real ones. Tests check greedy ids
and fp32 logits (1e-5) of the compiled twin against the eager step on CPU, and of the graph twin on
CUDA. After gpt-fast's CUDA-graph decoding and transformers' static cache.
"""

from __future__ import annotations

import itertools
import types
import weakref

import torch
from torch import Tensor

from ..model.cache import DecodeCache
from ..model.t5 import T5

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
        return step_logits(self.model, self.cache, tokens)

    def select(self, rows: Tensor, cross_too: bool = True) -> None:
        self.cache.select(rows, cross_too)


def step_logits(model: T5, cache: DecodeCache, tokens: Tensor) -> Tensor:
    """The decode step: tokens (N, 1) -> fp32 logits (N, V) of the next token; the cache takes the
    tokens' K/V and every row moves one position. Logits split by vocabulary (tensor parallelism
    leaves the LM head's output a DTensor, training/parallel.py) are gathered whole: the logits
    processors, sampling and beam search read every token's score."""
    logits = model.logits(model.decode(tokens, cache=cache))[:, -1].float()  # (N, 1, V) -> (N, V)
    return logits.full_tensor() if _is_dtensor(logits) else logits


def _is_dtensor(t: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def weights_of(model: T5) -> tuple:
    """The state of the weights a slot's step reads: each parameter's and buffer's address and version
    counter. The address changes when weights move (`Module.to`, FSDP2's all-gather into new storage,
    `load_state_dict(assign=True)`), the version when they change in place (`load_state_dict`, an
    optimizer step); packing or quantizing (cpu.py) removes the Linear weights. A CUDA graph reads
    each weight through the address it had at capture, and inductor's freezing would compile the
    values in: a slot is reused only over the state it was built over. DTensors' own data_ptr is 0:
    their local shard's is read."""
    return tuple((_local(t).data_ptr(), t._version) for t in itertools.chain(model.parameters(), model.buffers()))


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


class Slot:
    """Fixed buffers for one shape (batch, source length, cache length, dtype, device, mode), the
    step run over them, and the state of the weights it was built over (`weights_of`). It holds no
    reference to the model (each call passes it): `_SLOTS` is keyed weakly by the model, and a value
    holding its key would keep every model decoded in graph or compile mode alive (issue 17)."""

    def __init__(self, model: T5, shape: tuple, weights: tuple):
        batch, src_len, max_len, dtype, device, mode = shape
        memory = torch.zeros(batch, src_len, model.config.d_model, dtype=dtype, device=device)
        self.shape, self.weights, self.mode = shape, weights, mode
        self.cache = DecodeCache(model.decoder, memory, None, max_len)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.logits: Tensor | None = None
        self.graph = None
        self.owner: weakref.ref | None = None  # the StaticDecoding using the buffers now
        self.fn = _compile(model, torch.device(device)) if mode == "compile" else step_logits

    def free_for(self, user: StaticDecoding) -> bool:
        """No other live decoding holds the buffers."""
        return self.owner is None or self.owner() in (None, user)

    def load(self, cache: DecodeCache) -> None:
        """Copy a request's state (n <= batch rows) into the buffers; padded rows and source
        positions are masked (rows: all keys kept, over zero K/V, so no NaN). The relative bias is
        the request's too, computed from the weights as they are now (FSDP2 gathers new values
        into the same storage without bumping the version counter, so `weights_of` cannot see it);
        distances past the request's length are never read (a row's keys are at most its position back)."""
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
        for mine, theirs in zip(self.cache.self_bias, cache.self_bias):  # (H, L) each, by distance back
            mine[:, :theirs.shape[1]] = theirs
        self.cache.pos.zero_()
        self.cache.pos[:n] = cache.pos

    def run(self, model: T5, tokens: Tensor) -> Tensor:
        """tokens (n, 1) -> fp32 logits (n, V); the padded rows run too and are dropped. Under CUDA
        graphs the logits are a view of the graph's output, overwritten by the next step."""
        n = tokens.shape[0]
        self.tokens[:n] = tokens
        if self.mode != "graph":
            return self.fn(model, self.cache, self.tokens)[:n]
        if self.graph is None:
            self._capture(model)
        self.graph.replay()
        return self.logits[:n]

    def _capture(self, model: T5) -> None:
        """Warm up on a side stream (lazy CUDA init, cuBLAS workspaces), then capture one step
        (PyTorch docs, "CUDA Graphs": whole-network capture). The step advances positions in place,
        so they are saved around warm-up and capture; warm-up writes K/V at the saved positions,
        which the first replay writes again."""
        pos = self.cache.pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(model, self.cache, self.tokens)
                self.cache.pos.copy_(pos)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.fn(model, self.cache, self.tokens)
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


def _compile(model: T5, device: torch.device):
    """torch.compile of the step, static shapes (one slot's). On CPU `freezing` is asked for: inductor
    would fold the weights into constants packed in oneDNN's layout. In torch 2.13 the option given
    here does not reach dynamo, which decides at trace time from the global inductor config
    (torch._dynamo.utils.is_parameter_freezing): the weights stay graph inputs (the output code
    reads them through extern mm; checked for issue 17), so new values are read at each call. Slots
    are keyed by the weights' state either way (`weights_of`). Weights packed by cpu.pack_linears
    (what `t5kit generate` runs) are called through the opaque operator cpu.onednn_linear, the
    rest of the step compiled around them (issue 19)."""
    options = {"freezing": True} if device.type == "cpu" else None
    # A copy of step_logits with a code object of its own: dynamo keeps compiled versions, and counts
    # recompilations against `recompile_limit` (8), per code object, so one shared by every slot
    # failed the ninth slot shape or model of a process (fullgraph: an error, not a fallback); this
    # way each slot compiles once, and its compiled code goes with it.
    fn = step_logits
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return torch.compile(own, fullgraph=True, dynamic=False, options=options)


_SLOTS: weakref.WeakKeyDictionary[T5, list[Slot]] = weakref.WeakKeyDictionary()  # least recently used first


def slot_for(user: StaticDecoding, shape: tuple) -> Slot:
    """A slot of `shape` over `user`'s weights, owned by `user` until it moves on or is dropped:
    the one it holds if that has the shape (a beam step keeps its slot: issue 17), else a listed
    one no other live decoding (an unfinished stream) holds, else a new one. Every slot in use is
    listed, the least recently used beyond MAX_SLOTS leaving the list (not its owner); slots built
    over another state of the weights leave it at once (`weights_of`)."""
    slots = _SLOTS.setdefault(user.model, [])
    slots[:] = [s for s in slots if s.weights == user.weights]
    if user.slot is not None and user.slot.shape == shape:
        slot = user.slot
    else:
        slot = next((s for s in slots if s.shape == shape and s.free_for(user)), None)
    if slot is None:
        slot = Slot(user.model, shape, user.weights)
    elif slot in slots:
        slots.remove(slot)
    slots.append(slot)
    del slots[:-MAX_SLOTS]
    slot.owner = weakref.ref(user)
    return slot


class StaticDecoding:
    """The step over a Slot's fixed buffers; n real rows in the first rows of the bucket. When
    finished rows leave and a smaller bucket fits, the state moves to that bucket's slot."""

    def __init__(self, model: T5, cache: DecodeCache, mode: str):
        self.model, self.mode = model, mode
        self.weights = weights_of(model)  # fixed while it decodes
        self.src_len = round_up(cache.cross_bias.shape[-1], LENGTH_STEP)
        self.max_len = round_up(cache.self_kv[0][0].shape[2], LENGTH_STEP)
        self.n = cache.pos.shape[0]
        self.slot: Slot | None = None
        self.slot = self._slot(self.n)
        self.slot.load(cache)

    def _slot(self, n: int) -> Slot:
        w = self.model.shared.weight
        return slot_for(self, (batch_bucket(n), self.src_len, self.max_len, w.dtype, str(w.device), self.mode))

    @property
    def rows(self) -> int:
        return self.n

    def __call__(self, tokens: Tensor) -> Tensor:
        return self.slot.run(self.model, tokens)

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


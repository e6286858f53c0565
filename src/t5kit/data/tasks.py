"""Batches of text-to-text tasks: one task or a mixture (T5 paper section 3.5.2, `mixture_rates`),
length-bucketed or packed; the iterator state resumes exactly and reshards across rank counts.
`collate` and `first_fit` are the one batch builder and the one packer, for task batches here and
span-corruption batches (pretraining.py).

Batch: int64 arrays input_ids (B, S) right-padded with pad; decoder_input_ids (B, T), the targets
shifted right behind the start token 0; labels (B, T), the targets with -100 at padding. Packed
batches have the fixed shape (B, inputs_length), (B, targets_length) and add segment_ids (B, S) and
decoder_segment_ids (B, T), 1-based per row, 0 = padding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from .task_cache import TokenizedTask

DECODER_START = 0  # T5 decoder_start_token_id (= pad id); every packed segment starts with it too
_BLOCK = 1024  # mixture task choices are drawn in seeded blocks of this many draws


def mixture_rates(sizes: list[int], mode: str = "proportional", cap: int | None = None,
                  temperature: float = 1.0) -> np.ndarray:
    """Mixing rates of tasks with `sizes` examples (T5 paper section 3.5.2).

    Examples-proportional: r_m = min(e_m, K) / sum_n min(e_n, K), with the cap K (None: no cap).
    Temperature-scaled: those rates raised to 1/T and renormalised (T = 1: proportional; large T
    tends to equal mixing).

    >>> mixture_rates([100, 300]).tolist()
    [0.25, 0.75]
    >>> mixture_rates([100, 300, 1000], cap=200).tolist()
    [0.2, 0.4, 0.4]
    >>> mixture_rates([100, 400], "temperature", temperature=2.0).round(4).tolist()
    [0.3333, 0.6667]
    """
    if mode not in ("proportional", "temperature"):
        raise ValueError(f"mixture mode {mode!r}: expected 'proportional' or 'temperature'")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1):
        raise ValueError(f"mixture cap {cap!r}: expected a positive number of examples or None")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"mixture temperature {temperature!r}: expected a positive number")
    if mode == "proportional" and temperature != 1:
        raise ValueError(f"mixture temperature {temperature!r} applies only to mode 'temperature'")
    e = np.asarray(sizes, dtype=np.float64)
    if e.ndim != 1 or len(e) == 0 or (e < 0).any() or e.sum() == 0:
        raise ValueError(f"mixture sizes {list(sizes)}: expected at least one task with examples")
    if cap is not None:
        e = np.minimum(e, cap)
    rates = e / e.sum()
    if mode == "temperature":
        rates = rates ** (1.0 / temperature)
        rates = rates / rates.sum()
    return rates


def collate(rows: list[list[tuple[np.ndarray, np.ndarray]]], pad: int, shape: tuple[int, int] | None = None,
            segments: bool | None = None) -> dict:
    """B rows of (inputs, targets) examples -> a batch. shape=None: one example a row, padded to the
    longest (B, S) / (B, T). shape=(S, T): fixed shape, examples packed with segment ids, each
    segment's decoder input starting with the start token (t5x `EncDecFeatureConverter(pack=True)`).
    segments: keep segment_ids / decoder_segment_ids (default: when the shape is fixed)."""
    s = shape[0] if shape else max(len(i) for row in rows for i, _ in row)
    t = shape[1] if shape else max(len(g) for row in rows for _, g in row)
    out = {"input_ids": np.full((len(rows), s), pad, np.int64),
           "decoder_input_ids": np.full((len(rows), t), pad, np.int64),
           "labels": np.full((len(rows), t), -100, np.int64),
           "segment_ids": np.zeros((len(rows), s), np.int64), "decoder_segment_ids": np.zeros((len(rows), t), np.int64)}
    for r, row in enumerate(rows):
        i = j = 0
        for seg, (inputs, targets) in enumerate(row, 1):
            out["input_ids"][r, i:i + len(inputs)] = inputs
            out["segment_ids"][r, i:i + len(inputs)] = seg
            out["labels"][r, j:j + len(targets)] = targets
            out["decoder_input_ids"][r, j] = DECODER_START  # shift right behind the start token
            out["decoder_input_ids"][r, j + 1:j + len(targets)] = targets[:-1]
            out["decoder_segment_ids"][r, j:j + len(targets)] = seg
            i, j = i + len(inputs), j + len(targets)
    if not (shape is not None if segments is None else segments):
        del out["segment_ids"], out["decoder_segment_ids"]
    return out


def first_fit(peek: Callable, take: Callable, lengths: Callable, shape: tuple[int, int], batch_size: int,
              pack: bool = True) -> list[list]:
    """One batch of rows from a stream: each item, in stream order, goes into the first row with room
    for its (input, target) `lengths` within `shape` (S, T), else into a new row; when the batch has
    `batch_size` rows and the next item fits none, the batch is done and that item stays in the
    stream (it opens the next batch). pack=False: one item per row. peek() -> the next item;
    take(item) consumes it. (t5x `EncDecFeatureConverter(pack=True)` packs the same way.)

    >>> items = iter([(3, 1), (2, 2), (4, 1), (1, 1), (4, 4)]); it = [next(items)]
    >>> first_fit(lambda: it[0], lambda _: it.__setitem__(0, next(items)), lambda x: x, (5, 4), 2)
    [[(3, 1), (2, 2)], [(4, 1), (1, 1)]]
    """
    rows: list[list] = []
    used: list[list[int]] = []  # per row: [input tokens, target tokens]
    while True:
        item = peek()
        a, b = lengths(item)
        r = next((k for k, (x, y) in enumerate(used) if x + a <= shape[0] and y + b <= shape[1]), None) if pack else None
        if r is None:
            if len(rows) == batch_size:
                return rows
            rows.append([])
            used.append([0, 0])
            r = len(rows) - 1
        rows[r].append(item)
        used[r][0] += a
        used[r][1] += b
        take(item)


class TaskBatches:
    """Iterator over training batches of one task or a mixture of tasks; state()/load_state() resume exactly.

    Example stream: draw d picks a task with the mixing `rates` (default: examples-proportional),
    from a Generator seeded by (seed, d // 1024); each task walks its own permutation per epoch,
    seeded by (seed, task, epoch). The stream is cut into chunks of global batches:
      pack=False: bucket_batches * batch_size * world examples, sorted by (input length, target
        length), cut into batches, and the batch order shuffled with a Generator seeded by
        (seed, chunk) -- length bucketing, so little padding; shapes vary per batch.
      pack=True: `world` batches of fixed shape (B, inputs_length) / (B, targets_length), each example
        going into the first row with room (`first_fit`, as pretraining.SpanCorruptionBatches).
    Every rank computes the same chunk and takes global batches with index % world == rank, so the
    state is the same counters on all ranks: the stream position at the chunk's start (draw index,
    per-task epoch and position), the chunk index, and the batches taken from it. Resuming
    mid-chunk recomputes the chunk and continues with identical batches."""

    def __init__(self, tasks: list[TokenizedTask], batch_size: int, *, rates=None, seed: int = 1234,
                 pack: bool = False, inputs_length: int | None = None, targets_length: int | None = None,
                 rank: int = 0, world: int = 1, bucket_batches: int = 50, pad: int = 0):
        if not tasks:
            raise ValueError("no tasks given")
        if batch_size < 1 or bucket_batches < 1 or world < 1 or not 0 <= rank < world:
            raise ValueError(f"batch_size={batch_size}, bucket_batches={bucket_batches}, rank={rank}, "
                             f"world={world}: expected positive sizes and 0 <= rank < world")
        self.tasks, self.batch_size, self.seed, self.pack = tasks, batch_size, seed, pack
        self.rank, self.world, self.bucket_batches, self.pad = rank, world, bucket_batches, pad
        sizes = [len(t.inputs) for t in tasks]
        self.rates = mixture_rates(sizes) if rates is None else np.asarray(rates, dtype=np.float64)
        if self.rates.shape != (len(tasks),) or (self.rates < 0).any() or not self.rates.sum() > 0:
            raise ValueError(f"rates {list(self.rates)}: expected {len(tasks)} non-negative numbers, not all 0")
        self.rates = self.rates / self.rates.sum()
        for t, n, r in zip(tasks, sizes, self.rates):
            if r > 0 and n == 0:
                raise ValueError(f"task {t.name!r} has no examples but mixing rate {r:.3g}")
        self.in_len = [np.array([len(x) for x in t.inputs], np.int64) for t in tasks]
        self.tg_len = [np.array([len(x) for x in t.targets], np.int64) for t in tasks]
        if pack:
            if not inputs_length or not targets_length:
                raise ValueError("pack=True needs inputs_length and targets_length (the fixed row shape)")
            for t, a, b in zip(tasks, self.in_len, self.tg_len):
                if len(a) and (a.max() > inputs_length or b.max() > targets_length):
                    raise ValueError(f"task {t.name!r} has examples of {a.max()} input / {b.max()} target tokens, "
                                     f"longer than the packed rows ({inputs_length} / {targets_length})")
        self.shape = (inputs_length, targets_length) if pack else None
        self.chunk, self.batch = 0, 0
        self._start = {"draw": 0, "epochs": [0] * len(tasks), "positions": [0] * len(tasks)}
        self._mine: list | None = None  # this rank's batches of the current chunk, as rows of (task, index)
        self._end: dict | None = None   # stream position after the current chunk
        self._perms: dict = {}
        self._picks = (None, None)

    def state(self) -> dict:
        return {"chunk": self.chunk, "batch": self.batch, "draw": self._start["draw"],
                "epochs": list(self._start["epochs"]), "positions": list(self._start["positions"])}

    def load_state(self, state: dict) -> None:
        if len(state["epochs"]) != len(self.tasks) or len(state["positions"]) != len(self.tasks):
            raise ValueError(f"iterator state is for {len(state['epochs'])} task(s), this run has {len(self.tasks)}")
        self.chunk, self.batch = int(state["chunk"]), int(state["batch"])
        self._start = {"draw": int(state["draw"]), "epochs": [int(e) for e in state["epochs"]],
                       "positions": [int(p) for p in state["positions"]]}
        self._mine = None

    def reshard(self, states: list[dict]) -> tuple[dict, int, int]:
        """The state to resume with from the (equal) states a checkpoint saved for len(states) !=
        world data-parallel ranks, and how many examples and tokens (inputs + targets) the change of
        rank count skips. A chunk is cut for a rank count, so a chunk begun under another count is left
        at its end (exact when every batch of it was taken, the rule in packed mode) and the next starts
        fresh here."""
        state = states[0]
        if int(state["batch"]) == 0:
            return state, 0, 0
        old = copy.copy(self)
        old.world, old._perms = len(states), {}
        examples = tokens = 0
        for old.rank in range(old.world):  # every old rank's untaken batches of the chunk
            old.load_state(state)
            old._make_chunk()
            skipped = [p for b in old._mine[int(state["batch"]):] for row in b for p in row]
            examples += len(skipped)
            tokens += sum(int(self.in_len[t][i]) + int(self.tg_len[t][i]) for t, i in skipped)
        end = old._end
        return ({"chunk": int(state["chunk"]) + 1, "batch": 0, "draw": end["draw"], "epochs": end["epochs"],
                 "positions": end["positions"]}, examples, tokens)

    # -- the example stream: pure functions of the counters --

    def _pick(self, draw: int) -> int:
        if len(self.tasks) == 1:
            return 0
        block = draw // _BLOCK
        if self._picks[0] != block:
            rng = np.random.default_rng([self.seed, 1, block])
            self._picks = (block, rng.choice(len(self.tasks), size=_BLOCK, p=self.rates))
        return int(self._picks[1][draw % _BLOCK])

    def _perm(self, task: int, epoch: int) -> np.ndarray:
        if self._perms.get(task, (None,))[0] != epoch:
            perm = np.random.default_rng([self.seed, 0, task, epoch]).permutation(len(self.tasks[task].inputs))
            self._perms[task] = (epoch, perm)
        return self._perms[task][1]

    def _peek(self, st: dict) -> tuple[int, int, int, int]:
        """The next example of the stream at `st`: (task, index, its epoch, its position)."""
        t = self._pick(st["draw"])
        epoch, pos = st["epochs"][t], st["positions"][t]
        if pos >= len(self.tasks[t].inputs):
            epoch, pos = epoch + 1, 0
        return t, int(self._perm(t, epoch)[pos]), epoch, pos

    def _advance(self, st: dict, peeked) -> None:
        t, _, epoch, pos = peeked
        st["draw"] += 1
        st["epochs"][t], st["positions"][t] = epoch, pos + 1

    # -- chunks --

    def _make_chunk(self) -> None:
        st = {"draw": self._start["draw"], "epochs": list(self._start["epochs"]),
              "positions": list(self._start["positions"])}
        if self.pack:
            batches = [self._packed_batch(st) for _ in range(self.world)]
        else:  # length buckets: sort the chunk by length, cut, shuffle the batch order
            n = self.bucket_batches * self.batch_size * self.world
            drawn = []
            for _ in range(n):
                p = self._peek(st)
                self._advance(st, p)
                drawn.append(p[:2])
            drawn.sort(key=lambda e: (self.in_len[e[0]][e[1]], self.tg_len[e[0]][e[1]]))  # stable: ties by draw
            cut = [[[e] for e in drawn[k:k + self.batch_size]] for k in range(0, n, self.batch_size)]
            order = np.random.default_rng([self.seed, 2, self.chunk]).permutation(len(cut))
            batches = [cut[k] for k in order]
        self._mine, self._end = batches[self.rank::self.world], st

    def _packed_batch(self, st: dict) -> list[list[tuple[int, int]]]:
        """The next batch of the stream at `st`, packed first-fit (`first_fit`)."""
        rows = first_fit(lambda: self._peek(st), lambda p: self._advance(st, p),
                         lambda p: (self.in_len[p[0]][p[1]], self.tg_len[p[0]][p[1]]), self.shape, self.batch_size)
        return [[p[:2] for p in row] for row in rows]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._mine is None:
            self._make_chunk()
        while self.batch >= len(self._mine):
            self._start, self.chunk, self.batch = self._end, self.chunk + 1, 0
            self._make_chunk()
        rows = self._mine[self.batch]
        self.batch += 1
        return collate([[(self.tasks[t].inputs[i], self.tasks[t].targets[i]) for t, i in row] for row in rows],
                        self.pad, self.shape)


def eval_batches(task: TokenizedTask, batch_size: int, pad: int = 0) -> Iterator[dict]:
    """One pass over every example in file order (not shuffled), padded to the longest in each
    batch; for validation loss. The last batch may be smaller."""
    for k in range(0, len(task.inputs), batch_size):
        yield collate([[(i, t)] for i, t in zip(task.inputs[k:k + batch_size], task.targets[k:k + batch_size])], pad)


def rank_share(batches: Iterable[dict], rank: int, world: int) -> Iterator[dict]:
    """Data-parallel rank `rank`'s share of an evaluation set given whole, in the same order, to
    every rank: batches rank, rank + world, ..., then, on a rank one batch short of the others, a
    copy of the first batch with every label -100, which counts no target token. So every rank runs
    the same number of forwards, ceil(n / world): under FSDP each forward all-gathers parameters
    with every other rank, and a rank with one batch more would wait forever (issue 17; FSDP2
    expects every rank to run every forward, pytorch/pytorch#152964).

    >>> batches = [{"labels": np.full((1, 2), k)} for k in range(3)]
    >>> [[int(b["labels"][0, 0]) for b in rank_share(batches, r, 2)] for r in (0, 1)]
    [[0, 2], [1, -100]]
    """
    n, first = 0, None
    for n, batch in enumerate(batches, 1):
        if first is None:
            first = batch
        if (n - 1) % world == rank:
            yield batch
    if n % world and rank >= n % world:
        yield {**first, "labels": np.full_like(first["labels"], -100)}


def resume_state(batches, states: list[dict], rank: int) -> tuple[dict, int, int]:
    """What data-parallel rank `rank` resumes from, given the per-rank iterator states a checkpoint
    saved, and how many examples and tokens the resume skips: its own state under the same rank count,
    else `batches.reshard(states)` (each stream knows how its position maps across rank counts)."""
    if len(states) == batches.world:
        return states[rank], 0, 0
    return batches.reshard(states)

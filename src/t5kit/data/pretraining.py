"""Span-corruption batches for pretraining: raw segments from a segment source (sources.py: one
store's `raw_segments`, or a `Blend`), each made an example by the objective (objectives.py: span
corruption, UL2's denoisers or a prefix LM) and batched in fixed shapes,
short group tails packed first-fit (tasks.first_fit); resumable, sharded by rank, reshardable; and
the fixed held-out evaluation set (`held_out_batches`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .objectives import Denoiser, Objective, span_objective
from .sources import Permutation, Strided
from .tasks import collate, first_fit


@dataclass(frozen=True)
class DataConfig:
    inputs_length: int = 512
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    seed: int = 1234


class SpanCorruptionBatches:
    """Fixed-shape batches of span-corrupted raw segments of a segment source (sources.py).

    Order: each epoch a permutation of the segments seeded by (seed, epoch) and computed one index at
    a time (`sources.Permutation`); rank r of w takes every w-th, so ranks never overlap. Each
    example's noise mask is seeded by (seed, epoch, segment), so a position resumes exactly from
    `state()`. Short segments (group tails) are packed first-fit several to a row with segment ids,
    so packed examples never attend to each other (t5x `EncDecFeatureConverter(pack=True)`), or
    dropped with pack=False.
    Batch: int64 arrays input_ids (B, I), decoder_input_ids and labels (B, T), and when packing
    segment_ids (B, I) and decoder_segment_ids (B, T), 1-based per row, 0 = padding."""

    def __init__(self, segments, cfg: DataConfig, first_sentinel: int, batch_size: int, rank: int = 0,
                 world: int = 1, eos: int = 1, pad: int = 0, pack: bool = True, objective: Objective | None = None):
        self.cfg, self.first_sentinel, self.eos, self.pad = cfg, first_sentinel, eos, pad
        # how a segment becomes an example (objectives.py; default: span corruption with cfg's settings); the
        # segments hold objective.segment_length tokens, the longest raw length of its denoisers
        self.objective = objective or span_objective(cfg.inputs_length, first_sentinel, eos, cfg.noise_density,
                                                     cfg.mean_noise_span_length)
        self.raw_len, self.targets_length = self.objective.segment_length, self.objective.targets_length
        self.segments = segments if pack else segments.full_only()
        self.batch_size, self.rank, self.world, self.pack = batch_size, rank, world, pack
        if len(self.segments) < world * batch_size:
            raise ValueError(f"corpus gives {len(self.segments)} segments of <= {self.raw_len} tokens, fewer than "
                             f"one batch ({batch_size} x {world} ranks); use more text or a shorter --seq-length")
        self.epoch, self.position = 0, 0  # position: examples this rank has consumed this epoch
        self._order_cache = (None, None)

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def reshard(self, states: list[dict]) -> tuple[dict, int, int]:
        """This rank's state from the states a checkpoint saved for len(states) != world
        data-parallel ranks, and how many examples and tokens the change of rank count skips. Rank r of w
        reads the epoch's order at r, r + w, ...: after p_r examples each, the stream is consumed below
        U = max over ranks of r + w (p_r - 1) + 1. This run's ranks continue at ceil(U / world): exact
        when the old ranks were level and world divides U (no example skipped or repeated), otherwise
        nothing is repeated and the holes are skipped. A rank still on an older epoch had its tail
        of that epoch left unread: those examples count as skipped too.

        >>> b = object.__new__(SpanCorruptionBatches); b.world = 1
        >>> b.segments = type("S", (), {"__len__": lambda s: 10, "raw": lambda s, i: [0] * (i + 1)})()
        >>> b.cfg = DataConfig(); b._order_cache = (None, None)
        >>> b.reshard([{"epoch": 0, "position": 3}, {"epoch": 0, "position": 3}])
        ({'epoch': 0, 'position': 6}, 0, 0)
        >>> state, examples, tokens = b.reshard([{"epoch": 1, "position": 1}, {"epoch": 0, "position": 4}])
        >>> state, examples, tokens == b._order(0, 0, 1)[9] + 1  # rank 1's 5th example (position 9) unread
        ({'epoch': 1, 'position': 1}, 1, True)
        """
        w, epoch, n = len(states), max(int(s["epoch"]) for s in states), len(self.segments)
        pos = [int(s["position"]) if int(s["epoch"]) == epoch else 0 for s in states]
        end = max((r + w * (p - 1) + 1 for r, p in enumerate(pos) if p), default=0)
        new = -(-end // self.world)
        # skipped (epoch, order position)s: the holes below new * world, and older epochs' unread tails
        holes = [(epoch, j) for r, p in enumerate(pos) for j in range(r + w * p, new * self.world, w)]
        for r, s in enumerate(states):
            for e in range(int(s["epoch"]), epoch):
                first = r + w * int(s["position"]) if e == int(s["epoch"]) else r
                holes += [(e, j) for j in range(first, n, w)]
        tokens = sum(len(self.segments.raw(self._order(e, 0, 1)[j])) for e, j in holes)
        return {"epoch": epoch, "position": new}, len(holes), tokens

    def _order(self, epoch: int, rank: int | None = None, world: int | None = None) -> Strided:
        """Segment indices rank `rank` of `world` (default: this one) reads in `epoch`, lazily."""
        if self._order_cache[0] != epoch:
            self._order_cache = (epoch, Permutation(len(self.segments), [self.cfg.seed, epoch]))
        rank, world = (self.rank, self.world) if rank is None else (rank, world)
        return Strided(self._order_cache[1], rank, world)

    def denoised(self, epoch: int, index: int) -> tuple[Denoiser, np.ndarray, np.ndarray, dict]:
        """Segment `index` in `epoch` -> (its denoiser, inputs, targets, info) (`Objective.example`). The
        denoiser is drawn and applied with a Generator seeded by (seed, epoch, index) alone, so an
        example is the same whatever the rank count or the resume point."""
        raw = self.segments.raw(index)
        rng = np.random.default_rng([self.cfg.seed, epoch, index])
        return self.objective.example(raw, rng)

    def example(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.denoised(epoch, index)[1:3]

    def _next(self) -> tuple[int, int]:
        """(epoch, segment index) of the next example, moving on to the next epoch at the end of one."""
        if self.position >= len(self._order(self.epoch)):
            self.epoch, self.position = self.epoch + 1, 0
        return self.epoch, int(self._order(self.epoch)[self.position])

    def _peek(self) -> tuple[np.ndarray, np.ndarray]:
        return self.example(*self._next())

    def upcoming(self, n: int) -> list[tuple[Denoiser, np.ndarray, np.ndarray, dict]]:
        """The next n examples of this rank's stream as `denoised` gives them, none consumed
        (`t5kit pretrain --show-examples`)."""
        state, out = self.state(), []
        for _ in range(n):
            out.append(self.denoised(*self._next()))
            self._take(None)
        self.load_state(state)
        return out

    def __iter__(self):
        return self

    def _take(self, _) -> None:
        self.position += 1

    def __next__(self) -> dict:
        """Examples are taken in order and packed first-fit (`tasks.first_fit`), one to a row
        without packing."""
        shape = (self.cfg.inputs_length, self.targets_length)
        rows = first_fit(self._peek, self._take, lambda ex: (len(ex[0]), len(ex[1])), shape, self.batch_size,
                         self.pack)
        return collate(rows, self.pad, shape, self.pack)


def held_out_batches(segments, cfg: DataConfig, first_sentinel: int, batch_size: int, n: int, **kw) -> list[dict]:
    """A fixed evaluation set: the first `n` batches of the segments' stream as one process reads it
    (rank 0 of 1), so every layout evaluates the same batches, given whole to every rank (the
    training loop splits them over the data-parallel ranks and keeps them in checkpoints)."""
    stream = SpanCorruptionBatches(segments, cfg, first_sentinel, batch_size, **kw)
    return [next(stream) for _ in range(n)]

"""Span-corruption batches for pretraining: a token store's documents, concatenated in groups and
cut into raw segments (`raw_segments`), each span-corrupted (spans.py) into fixed-shape batches,
short group tails packed first-fit (tasks.first_fit); resumable, sharded by rank, reshardable; and
the fixed held-out evaluation set (`held_out_batches`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .spans import random_spans_helper, span_corrupt
from .tasks import collate, first_fit


@dataclass(frozen=True)
class DataConfig:
    inputs_length: int = 512
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    seed: int = 1234


def raw_segments(offsets: np.ndarray, raw_len: int, group_docs: int = 128) -> np.ndarray:
    """(start, length) of each raw segment, (N, 2). Documents are concatenated in groups of
    `group_docs` with no separator (seqio `reduce_concat_tokens(batch_size=128)`) and each group's
    stream is cut into `raw_len` pieces (`split_tokens`), so each group ends in a shorter tail.

    >>> raw_segments(np.array([0, 5, 9, 20]), raw_len=4, group_docs=2).tolist()
    [[0, 4], [4, 4], [8, 1], [9, 4], [13, 4], [17, 3]]
    """
    bounds = np.append(offsets[:-1:group_docs], offsets[-1])
    return np.array([(a, min(raw_len, end - a)) for start, end in zip(bounds[:-1], bounds[1:])
                     for a in range(int(start), int(end), raw_len)], dtype=np.int64).reshape(-1, 2)


class SpanCorruptionBatches:
    """Fixed-shape batches of span-corrupted raw segments (see `raw_segments`).

    Order: each epoch a permutation of the segments seeded by (seed, epoch); rank r of w takes
    every w-th, so ranks never overlap. Each example's noise mask is seeded by (seed, epoch,
    segment), so a position resumes exactly from `state()`. Short segments (group tails) are packed
    first-fit several to a row with segment ids, so packed examples never attend to each other (t5x
    `EncDecFeatureConverter(pack=True)`), or dropped with pack=False.
    Batch: int64 arrays input_ids (B, I), decoder_input_ids and labels (B, T), and when packing
    segment_ids (B, I) and decoder_segment_ids (B, T), 1-based per row, 0 = padding."""

    def __init__(self, tokens: np.ndarray, segments: np.ndarray, cfg: DataConfig, first_sentinel: int,
                 batch_size: int, rank: int = 0, world: int = 1, eos: int = 1, pad: int = 0, pack: bool = True):
        self.tokens, self.cfg, self.first_sentinel, self.eos, self.pad = tokens, cfg, first_sentinel, eos, pad
        self.raw_len, self.targets_length = random_spans_helper(cfg.inputs_length, cfg.noise_density,
                                                                cfg.mean_noise_span_length)
        self.segments = segments if pack else segments[segments[:, 1] == self.raw_len]
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

    def reshard(self, states: list[dict]) -> tuple[dict, int]:
        """This rank's state from the states a checkpoint saved for len(states) != world
        data-parallel ranks, and how many examples the change of rank count skips. Rank r of w reads the epoch's
        order at r, r + w, ...: after p_r examples each, the stream is consumed below U = max over
        ranks of r + w (p_r - 1) + 1. This run's ranks continue at ceil(U / world): exact when the
        old ranks were level and world divides U (no example skipped or repeated), otherwise
        nothing is repeated and the holes are skipped.

        >>> b = object.__new__(SpanCorruptionBatches); b.world = 1
        >>> b.reshard([{"epoch": 0, "position": 3}, {"epoch": 0, "position": 3}])
        ({'epoch': 0, 'position': 6}, 0)
        """
        w, epoch = len(states), max(int(s["epoch"]) for s in states)
        pos = [int(s["position"]) if int(s["epoch"]) == epoch else 0 for s in states]
        end = max((r + w * (p - 1) + 1 for r, p in enumerate(pos) if p), default=0)
        new = -(-end // self.world)
        return {"epoch": epoch, "position": new}, new * self.world - sum(pos)

    def _order(self, epoch: int) -> np.ndarray:
        if self._order_cache[0] != epoch:
            perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.segments))
            self._order_cache = (epoch, perm[self.rank::self.world])
        return self._order_cache[1]

    def example(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, length = self.segments[index]
        raw = np.asarray(self.tokens[start:start + length], dtype=np.int64)
        rng = np.random.default_rng([self.cfg.seed, epoch, index])
        return span_corrupt(raw, rng, self.first_sentinel, self.eos, self.cfg.noise_density,
                            self.cfg.mean_noise_span_length)

    def _peek(self) -> tuple[np.ndarray, np.ndarray]:
        if self.position >= len(self._order(self.epoch)):
            self.epoch, self.position = self.epoch + 1, 0
        return self.example(self.epoch, int(self._order(self.epoch)[self.position]))

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


def held_out_batches(tokens: np.ndarray, segments: np.ndarray, cfg: DataConfig, first_sentinel: int, batch_size: int,
                     n: int, **kw) -> list[dict]:
    """A fixed evaluation set: the first `n` batches of the segments' stream as one process reads it
    (rank 0 of 1), so every layout evaluates the same batches, given whole to every rank (the
    training loop splits them over the data-parallel ranks and keeps them in checkpoints)."""
    stream = SpanCorruptionBatches(tokens, segments, cfg, first_sentinel, batch_size, **kw)
    return [next(stream) for _ in range(n)]

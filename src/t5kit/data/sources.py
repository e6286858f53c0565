"""Segment sources: where pretraining's raw segments come from, addressed by index, computed on
demand so that no process holds an array the size of the corpus.

- `SegmentTable` (`raw_segments`): one token array's documents, concatenated in groups and cut into
  raw segments; it keeps only the group boundaries (one int64 per 128 documents).
- `Blend`: several tables mixed by weight (Megatron's `--data-path W1 P1 W2 P2`).
- `Permutation`: a seeded random permutation of range(n), one index at a time (the epoch order).

A source has len(), raw(i) (segment i's tokens, int64), full_only() (the source without the short
group tails, for --drop-remainders), remainders() (what that leaves out) and n_tokens().
"""

from __future__ import annotations

import itertools

import numpy as np

_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser (Steele et al. 2014): a bijective 64-bit hash."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class Permutation:
    """A random permutation of range(n) seeded by `seed`, computed one index at a time in O(1)
    memory: a 4-round Feistel network on the smallest even bit width covering n, cycle-walked back
    into range(n) (Black & Rogaway, "Ciphers with arbitrary finite domains", 2002). A Feistel
    network is a bijection whatever its round function, so this is a permutation by construction.

    >>> p = Permutation(10, [1, 2])
    >>> sorted(p[i] for i in range(10)) == list(range(10))
    True
    """

    def __init__(self, n: int, seed):
        self.n = int(n)
        self.half = max(1, ((self.n - 1).bit_length() + 1) // 2)
        self.mask = (1 << self.half) - 1
        self.keys = [int(k) for k in np.random.default_rng(seed).integers(0, 2**63, size=4)]

    def __len__(self) -> int:
        return self.n

    def _feistel(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right

    def __getitem__(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range({self.n})")
        x = self._feistel(i)
        while x >= self.n:  # at most 3 in 4 points of the domain are outside: a few steps on average
            x = self._feistel(x)
        return x


class Strided:
    """Items start, start + step, ... of a sequence, lazily: rank r's share of an epoch's order."""

    def __init__(self, seq, start: int, step: int):
        self.seq, self.start, self.step = seq, start, step

    def __len__(self) -> int:
        return max(0, -(-(len(self.seq) - self.start) // self.step))

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.seq[self.start + i * self.step]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class SegmentTable:
    """Raw segments of one token array (see `raw_segments`): segment i is (start, length), found
    from the group boundaries by binary search. Rows come back as an (k, 2) int64 array for any
    numpy index: table[i], table[a:b], table[idx], table[:, 1]."""

    def __init__(self, tokens, bounds: np.ndarray, raw_len: int, full_only: bool = False):
        self.tokens, self.bounds, self.raw_len, self.is_full_only = tokens, np.asarray(bounds, np.int64), raw_len, \
            full_only
        sizes = np.diff(self.bounds)
        per_group = sizes // raw_len if full_only else -(-sizes // raw_len)
        self.cum = np.concatenate([[0], np.cumsum(per_group)])

    def __len__(self) -> int:
        return int(self.cum[-1])

    def rows(self, idx) -> np.ndarray:
        """(start, length) of the segments idx (an int array), (k, 2) int64."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"segment index out of range({len(self)})")
        g = np.searchsorted(self.cum, idx, side="right") - 1
        start = self.bounds[g] + (idx - self.cum[g]) * self.raw_len
        return np.stack([start, np.minimum(self.raw_len, self.bounds[g + 1] - start)], axis=-1)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self[key[0]][(slice(None), *key[1:])]
        if isinstance(key, slice):
            return self.rows(np.arange(*key.indices(len(self))))
        if np.ndim(key) == 0:
            return self.rows(int(key) + len(self) if int(key) < 0 else int(key))
        return self.rows(key)

    def raw(self, i: int) -> np.ndarray:
        start, length = self.rows(int(i))
        return np.asarray(self.tokens[start:start + length], dtype=np.int64)

    def full_only(self) -> SegmentTable:
        return SegmentTable(self.tokens, self.bounds, self.raw_len, full_only=True)

    def n_tokens(self) -> int:
        return int(self.bounds[-1] - self.bounds[0])

    def remainders(self) -> tuple[int, int]:
        """(segments, tokens) in the short group tails: what full_only() leaves out."""
        tails = np.diff(self.bounds) % self.raw_len
        return int((tails > 0).sum()), int(tails.sum())


def raw_segments(tokens, bounds: np.ndarray, raw_len: int) -> SegmentTable:
    """Raw segments of `tokens` whose document groups start at `bounds` (token offsets, the last
    one the end). Documents are concatenated in groups of 128 with no separator (seqio
    `reduce_concat_tokens(batch_size=128)`; `group_bounds` gives the boundaries) and each group's
    stream is cut into `raw_len` pieces (`split_tokens`), so each group ends in a shorter tail.

    >>> raw_segments(np.arange(20), np.array([0, 9, 20]), raw_len=4)[:].tolist()
    [[0, 4], [4, 4], [8, 1], [9, 4], [13, 4], [17, 3]]
    """
    return SegmentTable(tokens, bounds, raw_len)


class Blend:
    """Sources mixed by weight (Megatron's blend, weights normalised). An epoch of the blend has as
    many examples as its sources together, N; source d gives n_d of them, N x its weight rounded by
    largest remainder, the first n_d of its segments in an order seeded by (seed, d, pass), so a
    source with more weight than size is read several times over and one with less is subsampled.
    Example i of the blend is example i - (n_0 + ... + n_{d-1}) of source d; the epoch permutation
    (SpanCorruptionBatches) interleaves them."""

    def __init__(self, sources: list, weights: list[float], names: list[str], seed: int):
        self.sources, self.names, self.seed = sources, names, seed
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        total = sum(len(s) for s in sources)
        want = self.weights * total
        counts = np.floor(want).astype(np.int64)
        counts[np.argsort(-(want - counts), kind="stable")[:total - int(counts.sum())]] += 1
        for s, n, name in zip(sources, counts, names):
            if n and not len(s):
                raise ValueError(f"{name}: no segments to draw its {n} examples from")
        self.counts = counts
        self.cum = np.concatenate([[0], np.cumsum(counts)])
        self._perms: dict[tuple[int, int], Permutation] = {}

    def __len__(self) -> int:
        return int(self.cum[-1])

    def _perm(self, d: int, lap: int) -> Permutation:
        if (d, lap) not in self._perms:
            self._perms[d, lap] = Permutation(len(self.sources[d]), [self.seed, d, lap])
        return self._perms[d, lap]

    def locate(self, i: int) -> tuple[int, int]:
        """(source, segment index in it) of example i."""
        d = int(np.searchsorted(self.cum, i, side="right") - 1)
        j, n = int(i - self.cum[d]), len(self.sources[d])
        return d, self._perm(d, j // n)[j % n]

    def raw(self, i: int) -> np.ndarray:
        d, j = self.locate(i)
        return self.sources[d].raw(j)

    def full_only(self) -> Blend:
        return Blend([s.full_only() for s in self.sources], list(self.weights), self.names, self.seed)

    def n_tokens(self) -> int:
        return sum(s.n_tokens() for s in self.sources)

    def remainders(self) -> tuple[int, int]:
        parts = [s.remainders() for s in self.sources]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def describe(self) -> str:
        return "; ".join(f"{name}: weight {w:.3f}, {n:,} examples per epoch ({n / max(len(s), 1):.2f} passes over "
                         f"its {len(s):,} segments)"
                         for name, w, n, s in zip(self.names, self.weights, self.counts, self.sources))


def parse_blend(items: list[str]) -> tuple[list[float] | None, list[str]]:
    """Megatron's `--data-path`: "W1 P1 W2 P2 ..." (weights, normalised later) or "P1 P2 ..." (no
    weights: each corpus as large as it is). An item that is a number and not an existing path starts
    a blend, which then needs an even number of items, a number at every odd place, no negative
    weight and a positive total.

    >>> parse_blend(["0.7", "a", "0.3", "b"])
    ([0.7, 0.3], ['a', 'b'])
    """
    import os

    def number(s: str) -> float | None:
        try:
            return None if os.path.exists(s) else float(s)
        except ValueError:
            return None
    if not items:
        raise ValueError("--data-path: nothing given")
    if number(items[0]) is None:
        return None, list(items)
    if len(items) % 2:
        raise ValueError(f"--data-path: a blend is W1 P1 W2 P2 ... (weight, corpus pairs), but {len(items)} items were "
                         f"given: {' '.join(items)}")
    weights = [number(w) for w in items[::2]]
    for w, item in zip(weights, items[::2]):
        if w is None:
            raise ValueError(f"--data-path: {item!r} stands where a blend has a weight (W1 P1 W2 P2 ...)")
    if any(w < 0 for w in weights) or sum(weights) <= 0 or not np.isfinite(sum(weights)):
        raise ValueError(f"--data-path: blend weights {', '.join(items[::2])}: expected weights >= 0 with a positive "
                         f"total")
    return weights, list(items[1::2])


def parse_split(split: str) -> list[float]:
    """Megatron's `--split` ("969,30,1", "99,1", "0.98,0.02"): train / valid / test shares,
    missing ones 0, normalised (blended_megatron_dataset_config.parse_and_normalize_split).

    >>> parse_split("969, 30, 1")
    [0.969, 0.03, 0.001]
    """
    import re
    try:
        parts = [float(x) for x in re.split(r"[,/\s]+", split.strip()) if x]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split {split!r}: expected up to three shares >= 0 with a positive total, "
                         f"train,valid,test (e.g. 969,30,1)")
    parts += [0.0] * (3 - len(parts))
    total = float(np.sum(np.array(parts, dtype=np.float64)))
    return [p / total for p in parts]


def split_documents(n_docs: int, split: list[float]) -> list[tuple[int, int]]:
    """[begin, end) documents of train, valid and test, as Megatron cuts them: book-ends at the
    cumulative shares, each rounded after multiplying by the document count
    (blended_megatron_dataset_builder: int(round(share * n))).

    >>> split_documents(1000, parse_split("969,30,1"))
    [(0, 969), (969, 999), (999, 1000)]
    """
    ends = [0.0]
    for share in split:
        ends.append(ends[-1] + share)
    return [(round(a * n_docs), round(b * n_docs)) for a, b in itertools.pairwise(ends)]


def split_sources(stores: list, weights: list[float] | None, split: list[float], raw_len: int, seed: int,
                  part: int) -> SegmentTable | Blend | None:
    """Part `part` (0 train, 1 valid, 2 test) of each store's documents, its raw segments, blended
    by `weights` (None: each part as large as it is) when there are several stores; None when the
    part is empty everywhere."""
    tables = []
    for store in stores:
        first, last = split_documents(store.n_docs, split)[part]
        tables.append(store.segments(raw_len, first, last))
    if len(tables) == 1:
        return tables[0] if len(tables[0]) else None
    sizes = [len(t) for t in tables]
    if not sum(sizes):
        return None
    w = sizes if weights is None else [wt if len(t) else 0.0 for wt, t in zip(weights, tables)]
    if sum(w) <= 0:
        return None
    return Blend(tables, w, [s.name for s in stores], seed)

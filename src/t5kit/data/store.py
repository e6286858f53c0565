"""Token stores: corpora tokenized once into files that every rank memory-maps.

Two formats, read alike (`open_store`):
- t5kit's own folder: `tokens.bin` (uint16 or uint32), `offsets.npy` (document starts, int64,
  n_docs + 1) and `header.json` (dtype, counts, the tokenizer's fingerprint, the unigram counts
  and the largest id), each written atomically, header last;
- Megatron-LM's `PREFIX.bin` / `PREFIX.idx` (megatron.py), with t5kit's notes on it (the largest
  id and where it is, the unigram counts) cached beside it in `PREFIX.t5kit.json`.

`build_token_store` writes either, streaming: document lengths go to a temporary file and the
offsets or index are written from it at the end, and the unigram counts (vocabulary-sized) are
summed as the tokens go by, so its memory does not grow with the corpus. Documents are tokenized
without EOS and concatenated without separators before cutting raw segments (sources.py; seqio
`reduce_concat_tokens` + `split_tokens`, T5_REFERENCE 4.1-4.4).
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile

import numpy as np

from ..atomic import atomic_path, write_json
from .megatron import WINDOW, MegatronIndex, gather, megatron_dtype, write_index
from .corpus import check_files, expand_inputs, iter_documents
from .sources import SegmentTable, raw_segments
from .tokenizer import Tokenizer

STORE_VERSION = 2  # 2 adds "unigram" and "max_id" to the header; version 1 stores still read
SAMPLE_TOKENS = 10_000_000  # Megatron data: the unigram baseline is estimated from this many tokens
SCAN_TOKENS = 1 << 22  # tokens per read of the start-up scan
_WORKER_TOK: Tokenizer | None = None
_WORKER_DTYPE = np.uint16


def _init_worker(tok: Tokenizer, dtype) -> None:
    global _WORKER_TOK, _WORKER_DTYPE
    _WORKER_TOK, _WORKER_DTYPE = tok, dtype


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    return [_WORKER_TOK.encode(t, add_eos=False, parse_special=False) for t in texts]  # text stays text (seqio)


def _encode_arrays(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens back to back, lengths) of the non-empty documents: numpy arrays, cheap to send back
    from a worker process (a list of Python ints is not)."""
    ids = [d for d in _encode_chunk(texts) if d]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=_WORKER_DTYPE, count=int(lengths.sum())), lengths


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy (nats) of token frequencies: the loss of a model that ignores context.

    >>> round(unigram_entropy(np.array([1, 1, 0, 2])), 4)
    1.0397
    """
    p = np.asarray(counts, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def _documents(paths: list[str], skip_bad_lines: bool, text_field: str, stats: dict, size: int = 512):
    buf = []
    for p in paths:
        for doc in iter_documents(p, skip_bad_lines, text_field, stats=stats):
            buf.append(doc)
            if len(buf) == size:
                yield buf
                buf = []
    if buf:
        yield buf


def build_token_store(paths: list[str], tok: Tokenizer, out: str, workers: int = 1, skip_bad_lines: bool = False,
                      progress: bool = True, text_field: str = "text", fmt: str = "t5kit") -> dict:
    """Tokenize corpora (files, directories, globs: corpus.expand_inputs) into a t5kit store folder
    `out` (fmt "t5kit") or Megatron's `out.bin` / `out.idx` (fmt "megatron"). -> the header."""
    from tqdm import tqdm

    if fmt not in ("t5kit", "megatron"):
        raise ValueError(f"--format {fmt!r}: expected t5kit or megatron")
    paths = expand_inputs(paths)
    check_files(paths)
    vocab = tok.vocab_size
    if fmt == "megatron":
        dtype, bin_path = np.dtype(megatron_dtype(vocab)), out + ".bin"
    else:
        dtype, bin_path = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32), os.path.join(out, "tokens.bin")
    os.makedirs(os.path.dirname(os.path.abspath(bin_path)), exist_ok=True)
    stats: dict = {}
    counts = np.zeros(vocab, dtype=np.int64)
    n_docs = n_tokens = 0
    max_id, max_at = -1, -1
    bar = tqdm(desc="tokenize", unit="doc", disable=not progress)
    with atomic_path(bin_path) as tmp, open(tmp, "wb") as f, \
            tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(bin_path))) as lengths:
        chunks = _documents(paths, skip_bad_lines, text_field, stats)
        if workers > 1:
            import multiprocessing as mp
            pool = mp.get_context("fork").Pool(workers, _init_worker, (tok, dtype))
            results = pool.imap(_encode_arrays, chunks)
        else:
            _init_worker(tok, dtype)
            pool, results = None, map(_encode_arrays, chunks)
        try:
            for ids, sizes in results:
                ids.tofile(f)
                sizes.astype(np.int32 if fmt == "megatron" else np.int64).tofile(lengths)
                counts += np.bincount(ids, minlength=vocab)[:vocab]
                if len(ids) and ids.max() > max_id:
                    max_id, max_at = int(ids.max()), n_tokens + int(np.argmax(ids))
                n_docs, n_tokens = n_docs + len(sizes), n_tokens + len(ids)
                bar.update(len(sizes))
        except BaseException:
            if pool is not None:
                pool.terminate()
            raise
        finally:
            bar.close()
        if pool is not None:
            pool.close()
            pool.join()
        if n_tokens == 0:
            raise ValueError(f"empty corpus: no text in {', '.join(paths)}")
        f.flush()
        header = {"version": STORE_VERSION, "dtype": dtype.name, "n_tokens": n_tokens, "n_docs": n_docs,
                  "tokenizer": tok.fingerprint(), "sources": paths, "skipped_lines": stats.get("skipped", 0),
                  "max_id": max_id, "unigram": counts.tolist()}
        if fmt == "megatron":
            with atomic_path(out + ".idx") as idx_tmp, open(idx_tmp, "wb") as g:
                write_index(g, lengths, n_docs, dtype)
        else:
            with atomic_path(os.path.join(out, "offsets.npy")) as off_tmp, open(off_tmp, "wb") as g:
                _write_offsets(g, lengths, n_docs)
    if fmt == "megatron":
        size, mtime = _stat(bin_path)
        write_json(out + ".t5kit.json", {**header, "bin_bytes": size, "bin_mtime_ns": mtime, "min_id": 0,
                                         "max_at": max_at})
    else:
        write_json(os.path.join(out, "header.json"), header)
    return header


def _write_offsets(f, lengths, n_docs: int) -> None:
    """offsets.npy (int64, n_docs + 1: 0 and the cumulative lengths) from a file of int64 lengths."""
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int64)),
                                             "fortran_order": False, "shape": (n_docs + 1,)})
    np.zeros(1, dtype=np.int64).tofile(f)
    lengths.seek(0)
    end = 0
    for a in range(0, n_docs, WINDOW):
        offsets = np.cumsum(np.fromfile(lengths, dtype=np.int64, count=min(WINDOW, n_docs - a))) + end
        offsets.tofile(f)
        end = int(offsets[-1])


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


class _Store:
    """What pretraining reads of a store: `tokens` (a 1-D memory map), `n_docs`, `doc_offsets`."""
    name: str
    tokens: np.ndarray
    n_docs: int

    def doc_offsets(self, docs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def group_bounds(self, first: int = 0, last: int | None = None, group_docs: int = 128) -> np.ndarray:
        """Token offsets of the document groups of documents first..last-1 (the last entry their end)."""
        last = self.n_docs if last is None else last
        return self.doc_offsets(np.append(np.arange(first, last, group_docs), last))

    def segments(self, raw_len: int, first: int = 0, last: int | None = None, group_docs: int = 128) -> SegmentTable:
        """Raw segments of documents first..last-1 (sources.raw_segments)."""
        return raw_segments(self.tokens, self.group_bounds(first, last, group_docs), raw_len)


class TokenStore(_Store):
    """A t5kit store folder, memory-mapped; with `tok`, checked to be built with that tokenizer."""

    def __init__(self, folder: str, tok: Tokenizer | None = None):
        path = os.path.join(folder, "header.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder}: not a token store (no header.json); build one with `t5kit preprocess`")
        with open(path, encoding="utf-8") as f:
            self.header = json.load(f)
        self.name = folder
        if self.header.get("version") not in (1, STORE_VERSION):
            raise ValueError(f"{path}: store version {self.header.get('version')}; this t5kit reads 1 and "
                             f"{STORE_VERSION}")
        if tok is not None and self.header["tokenizer"] != tok.fingerprint():
            raise ValueError(f"{folder}: token store was built with tokenizer {self.header['tokenizer']}, "
                             f"but the run uses {tok.fingerprint()}; rebuild it with this tokenizer")
        self.tokens = np.memmap(os.path.join(folder, "tokens.bin"), dtype=self.header["dtype"], mode="r")
        if len(self.tokens) != self.header["n_tokens"]:
            raise ValueError(f"{folder}/tokens.bin: {len(self.tokens)} tokens, header says {self.header['n_tokens']}")
        self.n_docs = int(self.header["n_docs"])
        self._offsets = os.path.join(folder, "offsets.npy")
        with open(self._offsets, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            self._offsets_at = f.tell()
        if shape != (self.n_docs + 1,) or dtype != np.int64:
            raise ValueError(f"{self._offsets}: {shape} {dtype}, expected ({self.n_docs + 1},) int64 (header.json)")

    def doc_offsets(self, docs: np.ndarray) -> np.ndarray:
        return gather(self._offsets, np.int64, self._offsets_at, self.n_docs + 1, docs)

    def unigram(self) -> np.ndarray:
        """Token counts: from the header (counted while preprocessing), else from a sample."""
        if "unigram" in self.header:
            return np.asarray(self.header["unigram"], dtype=np.int64)
        return sample_unigram(os.path.join(self.name, "tokens.bin"), self.tokens.dtype, len(self.tokens))

    def scan(self) -> dict:
        """Nothing to scan: the tokenizer's fingerprint was checked, and its ids fit its vocabulary."""
        return {}

    def check_vocab(self, vocab_size: int) -> None:
        """See `scan`."""


class MegatronStore(_Store):
    """Megatron's PREFIX.bin / PREFIX.idx, memory-mapped (no tokenizing again)."""

    def __init__(self, prefix: str):
        self.index = MegatronIndex(prefix)
        self.name, self.n_docs = prefix, self.index.n_docs
        self.tokens = np.memmap(self.index.bin_path, dtype=self.index.dtype, mode="r", shape=(self.index.n_tokens,)) \
            if self.index.n_tokens else np.zeros(0, dtype=self.index.dtype)
        self.notes_path = prefix + ".t5kit.json"

    def doc_offsets(self, docs: np.ndarray) -> np.ndarray:
        return self.index.doc_offsets(docs)

    def notes(self) -> dict:
        """t5kit's notes cached beside the .bin (largest id and where; unigram counts when t5kit wrote
        the file), valid while the .bin keeps its size and modification time."""
        try:
            with open(self.notes_path, encoding="utf-8") as f:
                notes = json.load(f)
            if [notes.get("bin_bytes"), notes.get("bin_mtime_ns")] == list(_stat(self.index.bin_path)):
                return notes
        except (OSError, ValueError):
            pass
        return {}

    def scan(self) -> dict:
        """The smallest and largest token id and where the largest first occurs: one vectorised pass
        over the .bin, window by window, cached beside it (`notes`) so later starts skip it."""
        notes = self.notes()
        if "max_id" in notes and "min_id" in notes:
            return notes
        lo, hi, hi_at = None, None, -1
        with open(self.index.bin_path, "rb") as f:  # read, not memory-mapped: resident pages would stay counted
            for a in range(0, len(self.tokens), SCAN_TOKENS):
                chunk = np.fromfile(f, dtype=self.index.dtype, count=min(SCAN_TOKENS, len(self.tokens) - a))
                cmax, cmin = chunk.max(), chunk.min()
                if hi is None or cmax > hi:
                    hi, hi_at = cmax, a + int(np.argmax(chunk))
                lo = cmin if lo is None else min(lo, cmin)
        size, mtime = _stat(self.index.bin_path)
        notes = {**notes, "bin_bytes": size, "bin_mtime_ns": mtime, "min_id": None if lo is None else lo.item(),
                 "max_id": None if hi is None else hi.item(), "max_at": hi_at}
        try:
            write_json(self.notes_path, notes)
        except OSError:  # a read-only dataset: the scan is simply done again next time
            pass
        return notes

    def check_vocab(self, vocab_size: int) -> None:
        notes = self.scan()
        if notes["max_id"] is not None and notes["max_id"] >= vocab_size:
            raise ValueError(f"{self.index.bin_path}: token id {notes['max_id']} (first at token {notes['max_at']:,}) "
                             f"is at or past the tokenizer's vocabulary size {vocab_size}; this data was tokenized "
                             f"with another tokenizer (give that one, e.g. --vocab-file / --tokenizer-model)")
        if notes["min_id"] is not None and notes["min_id"] < 0:
            raise ValueError(f"{self.index.bin_path}: negative token id {notes['min_id']}; expected ids 0.."
                             f"{vocab_size - 1}")
        if self.index.dtype.kind == "f":
            raise ValueError(f"{self.index.idx_path}: dtype {self.index.dtype.name} holds no token ids")

    def unigram(self) -> np.ndarray:
        notes = self.notes()
        if "unigram" in notes:
            return np.asarray(notes["unigram"], dtype=np.int64)
        return sample_unigram(self.index.bin_path, self.index.dtype, self.index.n_tokens)


def sample_unigram(path: str, dtype, n_tokens: int, n: int = SAMPLE_TOKENS, windows: int = 100) -> np.ndarray:
    """Token counts of a fixed sample of a token file: all of it up to n tokens, else `windows`
    evenly spaced runs that add up to n (the same sample every time). Read, not memory-mapped, so
    the pages do not stay resident."""
    dtype = np.dtype(dtype)
    if n_tokens <= n:
        size = min(WINDOW, max(n_tokens, 1))
        starts = range(0, n_tokens, size)
    else:
        size = n // windows
        starts = np.linspace(0, n_tokens - size, windows).astype(np.int64)
    counts = np.zeros(1, dtype=np.int64)
    with open(path, "rb") as f:
        for a in starts:
            f.seek(int(a) * dtype.itemsize)
            c = np.bincount(np.fromfile(f, dtype=dtype, count=min(size, n_tokens - int(a))).astype(np.int64))
            counts = np.pad(counts, (0, max(0, len(c) - len(counts)))) + np.pad(c, (0, max(0, len(counts) - len(c))))
    return counts


def megatron_prefix(spec: str) -> str | None:
    """The prefix of a Megatron dataset named by spec (PREFIX, PREFIX.bin or PREFIX.idx), else None."""
    prefix = spec[:-4] if spec.endswith((".bin", ".idx")) else spec
    if prefix == spec and os.path.exists(spec):  # a file or folder of that very name
        return None
    return prefix if os.path.isfile(prefix + ".idx") or os.path.isfile(prefix + ".bin") else None


def is_store(spec: str) -> bool:
    return os.path.isfile(os.path.join(spec, "header.json")) or megatron_prefix(spec) is not None


def open_store(spec: str, tok: Tokenizer | None = None) -> _Store:
    """A t5kit store folder or a Megatron prefix, memory-mapped."""
    prefix = megatron_prefix(spec)
    return MegatronStore(prefix) if prefix is not None else TokenStore(spec, tok)

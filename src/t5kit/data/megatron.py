"""Megatron-LM's indexed datasets (`PREFIX.idx` + `PREFIX.bin`, the MMIDIDX format): the index
read and checked, and both files written streaming.

Layout (megatron/core/datasets/indexed_dataset.py, `_IndexWriter` / `_IndexReader`), little-endian:
the 9 bytes b"MMIDIDX\\x00\\x00", u64 version (1), u8 dtype code (`DTYPES`), u64 sequence count S,
u64 document count D, then int32 sequence lengths (S), int64 byte pointers of the sequences into
the .bin (S), int64 document indices (D: the sequence each document starts at, 0 first and S last,
so D is the number of documents + 1) and, for multimodal data only, int8 modes (S). The .bin holds
the sequences' tokens back to back in the dtype. With `--split-sentences` a document is several
sequences; t5kit reads a document as the tokens from its first sequence to the next document's.
"""

from __future__ import annotations

import os
import struct

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}  # Megatron's DType enum
CODES = {np.dtype(t): c for c, t in DTYPES.items()}
_HEAD = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents: 34 bytes
WINDOW = 1 << 20  # entries read at a time from an on-disk array (8 MiB of int64)


def megatron_dtype(vocab_size: int) -> type:
    """The token dtype Megatron's preprocess_data.py picks (`DType.optimal_dtype`)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def gather(path: str, dtype, offset: int, count: int, idx: np.ndarray) -> np.ndarray:
    """Values at the sorted positions `idx` of an array of `count` items of `dtype` stored at byte
    `offset` of `path`, read window by window: the memory used is one window, however long the
    array (a memory map touched at every 128th entry would make every page resident)."""
    idx = np.asarray(idx, dtype=np.int64)
    out = np.empty(len(idx), dtype=dtype)
    size = np.dtype(dtype).itemsize
    with open(path, "rb") as f:
        for a in range(0, count, WINDOW):
            lo, hi = np.searchsorted(idx, [a, a + WINDOW])
            if lo < hi:
                f.seek(offset + a * size)
                window = np.fromfile(f, dtype=dtype, count=min(WINDOW, count - a))
                out[lo:hi] = window[idx[lo:hi] - a]
    return out


class MegatronIndex:
    """A checked .idx / .bin pair: dtype, counts, and where each part of the index starts."""

    def __init__(self, prefix: str):
        self.prefix, self.idx_path, self.bin_path = prefix, prefix + ".idx", prefix + ".bin"
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: not found (a Megatron dataset is PREFIX.bin + PREFIX.idx)")
        size = os.path.getsize(self.idx_path)
        with open(self.idx_path, "rb") as f:
            head = f.read(_HEAD.size)
        if len(head) < _HEAD.size or head[:9] != MAGIC:
            raise ValueError(f"{self.idx_path}: not a Megatron index (expected the magic bytes {MAGIC!r} at the "
                             f"start, got {head[:9]!r})")
        _, version, code, self.n_seqs, n_doc_idx = _HEAD.unpack(head)
        if version != 1:
            raise ValueError(f"{self.idx_path}: MMIDIDX version {version}; t5kit reads version 1")
        if code not in DTYPES:
            raise ValueError(f"{self.idx_path}: unknown dtype code {code}; expected one of "
                             + ", ".join(f"{c} ({np.dtype(t).name})" for c, t in DTYPES.items()))
        self.dtype = np.dtype(DTYPES[code])
        self.n_docs = n_doc_idx - 1
        self.lengths_at = _HEAD.size
        self.pointers_at = self.lengths_at + 4 * self.n_seqs
        self.doc_idx_at = self.pointers_at + 8 * self.n_seqs
        need = self.doc_idx_at + 8 * n_doc_idx
        if size < need or n_doc_idx < 1:
            raise ValueError(f"{self.idx_path}: {size} bytes, but its header ({self.n_seqs} sequences, {n_doc_idx} "
                             f"document indices) needs {need}: the index is truncated")
        self.n_tokens = self._end_of_sequences() // self.dtype.itemsize
        bin_size = os.path.getsize(self.bin_path)
        if bin_size < self.n_tokens * self.dtype.itemsize:
            raise ValueError(f"{self.bin_path}: {bin_size} bytes, shorter than the "
                             f"{self.n_tokens * self.dtype.itemsize} its index {self.idx_path} says ({self.n_tokens} "
                             f"{self.dtype.name} tokens): truncated?")

    def _end_of_sequences(self) -> int:
        if not self.n_seqs:
            return 0
        last = self.n_seqs - 1
        ptr = gather(self.idx_path, np.int64, self.pointers_at, self.n_seqs, [last])[0]
        length = gather(self.idx_path, np.int32, self.lengths_at, self.n_seqs, [last])[0]
        return int(ptr) + int(length) * self.dtype.itemsize

    def doc_offsets(self, docs: np.ndarray) -> np.ndarray:
        """Token offsets where the documents `docs` (sorted, 0..n_docs) start; n_docs -> the end."""
        seqs = gather(self.idx_path, np.int64, self.doc_idx_at, self.n_docs + 1, docs)
        inside = seqs < self.n_seqs
        out = np.full(len(seqs), self.n_tokens, dtype=np.int64)
        out[inside] = gather(self.idx_path, np.int64, self.pointers_at, self.n_seqs, seqs[inside]) \
            // self.dtype.itemsize
        return out


def write_index(f, lengths, n_docs: int, dtype) -> None:
    """An .idx for `n_docs` documents of one sequence each (Megatron's `IndexedDatasetBuilder`
    without --split-sentences) into the binary file f; `lengths` is a binary file of their int32
    lengths, read window by window."""
    dtype = np.dtype(dtype)
    if dtype not in CODES:
        raise ValueError(f"dtype {dtype.name} has no Megatron code")
    f.write(_HEAD.pack(MAGIC, 1, CODES[dtype], n_docs, n_docs + 1))
    lengths.seek(0)
    while chunk := lengths.read(4 * WINDOW):
        f.write(chunk)
    lengths.seek(0)
    pointer = 0
    for a in range(0, n_docs, WINDOW):
        size = np.fromfile(lengths, dtype=np.int32, count=min(WINDOW, n_docs - a)).astype(np.int64) * dtype.itemsize
        ends = np.cumsum(size) + pointer
        (ends - size).tofile(f)
        pointer = int(ends[-1])
    for a in range(0, n_docs + 1, WINDOW):
        np.arange(a, min(a + WINDOW, n_docs + 1), dtype=np.int64).tofile(f)

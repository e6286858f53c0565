"""Token stores: corpora tokenized once into a folder that every rank memory-maps.

A store holds `tokens.bin` (uint16 or uint32), `offsets.npy` (document starts, int64, n_docs + 1)
and `header.json` (dtype, counts, the tokenizer's fingerprint), each written atomically, header
last. Documents are tokenized without EOS and concatenated without separators before cutting raw
segments (pretraining.py; seqio `reduce_concat_tokens` + `split_tokens`, T5_REFERENCE 4.1-4.4).
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..atomic import atomic_path, write_json
from .readers import check_files, iter_documents
from .tokenizer import Tokenizer

STORE_VERSION = 1
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

    check_files(paths)
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

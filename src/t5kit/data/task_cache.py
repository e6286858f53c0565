"""Tokenised tasks: (input, target) pairs -> int32 token ids ending in EOS, truncated to the
maximum lengths (counted, never silent), kept in a cache file keyed by everything that changes
them, so a second run with the same files and settings does not tokenize again."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

import numpy as np

from ..atomic import atomic_path
from .readers import TaskSource, check_exists, read_examples
from .tokenizer import truncate_ids

CACHE_VERSION = 2


@dataclass
class TokenizedTask:
    name: str
    inputs: list[np.ndarray]    # int32 ids, each ending in EOS
    targets: list[np.ndarray]
    n_truncated_inputs: int
    n_truncated_targets: int
    n_skipped: int = 0          # malformed lines skipped (TaskSource.skip_bad_lines)


def _source_key(path: str) -> object:
    """What identifies the source's content: size + mtime_ns + path (every file of a directory)."""
    if path.startswith("hf:"):
        return path
    check_exists(path)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    return [[os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]


def tokenize_task(source: TaskSource, tok, max_input_length: int, max_target_length: int,
                  cache_dir: str | None = None, progress: bool = False) -> TokenizedTask:
    """Tokenize a task once; with cache_dir the ids are kept in `<cache_dir>/<name>-<key>.npz`, keyed
    by the source (size, mtime, path), prefix, fields, tokenizer fingerprint and lengths, so a
    changed file or setting tokenizes again. Truncated examples are counted, never silent."""
    for flag, n in (("max_input_length", max_input_length), ("max_target_length", max_target_length)):
        if n < 1:
            raise ValueError(f"{flag}={n}: expected at least 1 (room for the EOS)")
    cache = None
    if cache_dir is not None:
        key = json.dumps([CACHE_VERSION, _source_key(source.path), source.prefix, source.input_field,
                          source.target_field, source.skip_bad_lines, tok.fingerprint(), max_input_length, max_target_length])
        safe = re.sub(r"[^\w.-]", "_", source.name)[:60]
        cache = os.path.join(cache_dir, f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz")
        task = _load_cache(cache, source.name)
        if task is not None:
            return task
    from tqdm import tqdm

    inputs, targets, n_in, n_tg, stats = [], [], 0, 0, {}
    for text, target in tqdm(read_examples(source, stats), desc=f"tokenize {source.name}", unit="ex", disable=not progress):
        # several references: train on the first (T5's SQuAD preprocessing takes answers[0])
        ids, labels = tok.encode(text), tok.encode(target if isinstance(target, str) else target[0])
        inputs.append(np.asarray(truncate_ids(ids, max_input_length, tok.eos_id), np.int32))
        targets.append(np.asarray(truncate_ids(labels, max_target_length, tok.eos_id), np.int32))
        n_in += len(ids) > max_input_length
        n_tg += len(labels) > max_target_length
    task = TokenizedTask(source.name, inputs, targets, n_in, n_tg, stats.get("skipped", 0))
    if cache is not None:
        _save_cache(cache, task)
    return task


def _flat(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    return (np.concatenate(rows) if rows else np.zeros(0, np.int32)), offsets


def _save_cache(path: str, task: TokenizedTask) -> None:
    (ins, in_off), (tgs, tg_off) = _flat(task.inputs), _flat(task.targets)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
        np.savez(f, inputs=ins, input_offsets=in_off, targets=tgs, target_offsets=tg_off,
                 truncated=np.array([task.n_truncated_inputs, task.n_truncated_targets], np.int64),
                 skipped=np.array(task.n_skipped, np.int64))


def _load_cache(path: str, name: str) -> TokenizedTask | None:
    """The cached task, or None when there is none or it cannot be read (then it is rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ins, tgs = z["inputs"], z["targets"]
            in_off, tg_off, cut, skipped = z["input_offsets"], z["target_offsets"], z["truncated"], z["skipped"]
    except (OSError, ValueError, KeyError, EOFError):
        return None
    return TokenizedTask(name, np.split(ins, in_off[1:-1]) if len(in_off) > 1 else [],
                         np.split(tgs, tg_off[1:-1]) if len(tg_off) > 1 else [], int(cut[0]), int(cut[1]),
                         int(skipped))

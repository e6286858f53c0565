"""Text-to-text fine-tuning data: task files -> (input, target) pairs -> token ids (cached) ->
length-bucketed or packed batches of one task or a mixture; iterator state resumes exactly.

Sources: .jsonl / .csv / .tsv / .parquet files, a `datasets` save_to_disk directory, or
"hf:NAME[@SPLIT]". A spec "FILE:PREFIX" prepends PREFIX to every input ("translate English to
French: ", T5 paper section 2.4). Mixtures follow T5 paper section 3.5.2 (`mixture_rates`).

Batch (as in data.py): int64 arrays input_ids (B, S) right-padded with pad; decoder_input_ids (B, T),
the targets shifted right behind the start token 0; labels (B, T), the targets with -100 at padding.
Packed batches have the fixed shape (B, inputs_length), (B, targets_length) and add segment_ids
(B, S) and decoder_segment_ids (B, T), 1-based per row, 0 = padding.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..atomic import atomic_path

EXTENSIONS = (".jsonl", ".csv", ".tsv", ".parquet")
DECODER_START = 0  # T5 decoder_start_token_id (= pad id); every packed segment starts with it too
CACHE_VERSION = 2
_BLOCK = 1024  # mixture task choices are drawn in seeded blocks of this many draws


# ---- sources ----

@dataclass(frozen=True)
class TaskSource:
    path: str               # a task file, a save_to_disk directory, or "hf:NAME[@SPLIT]"
    prefix: str = ""        # prepended to every input
    input_field: str = "input"
    target_field: str = "target"
    name: str = ""          # short task name for logs (default: file stem, or the hf dataset name)
    skip_bad_lines: bool = False  # skip (and count) malformed lines / rows instead of stopping

    def __post_init__(self):
        if not self.name:
            if self.path.startswith("hf:"):
                name = self.path[3:].split("@")[0].rstrip("/").split("/")[-1]
            else:
                name = os.path.splitext(os.path.basename(self.path.rstrip("/\\")))[0]
            object.__setattr__(self, "name", name or self.path)


def parse_source(spec: str, prefix: str = "", input_field: str = "input", target_field: str = "target",
                 skip_bad_lines: bool = False) -> TaskSource:
    """"FILE" or "FILE:PREFIX". A spec that is an existing path has no prefix; otherwise it splits at
    the first ':' whose left side exists, ends in a known extension, or is an hf: spec, so the prefix
    may itself hold ':'. A prefix in the spec beats the `prefix` argument.

    >>> s = parse_source("train.jsonl:translate English to French: ")
    >>> s.path, s.prefix, s.name
    ('train.jsonl', 'translate English to French: ', 'train')
    >>> s = parse_source("hf:cnn_dailymail@validation:summarize: ", input_field="article")
    >>> s.path, s.prefix, s.input_field, s.name
    ('hf:cnn_dailymail@validation', 'summarize: ', 'article', 'cnn_dailymail')
    """
    if not spec:
        raise ValueError("empty task spec; expected FILE or FILE:PREFIX")
    path = spec
    if not os.path.exists(spec):
        i = spec.find(":", 3 if spec.startswith("hf:") else 0)
        while i != -1:
            left = spec[:i]
            if left.startswith("hf:") or os.path.exists(left) or left.lower().endswith(EXTENSIONS):
                path, prefix = left, spec[i + 1:]
                break
            i = spec.find(":", i + 1)
    return TaskSource(path, prefix, input_field, target_field, skip_bad_lines=skip_bad_lines)


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: task file not found")


class BadLine(ValueError):
    """A malformed line or row: an error, or with TaskSource.skip_bad_lines skipped and counted."""


def _text(path: str, where: str, field: str, value, flag: str) -> str:
    """A field's value as text: strings as they are, numbers as str; anything else is a bad line."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
            raise BadLine(f"{path}: {where} field {field!r} holds an unpaired surrogate escape, "
                          "which is not text") from None
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise BadLine(f"{path}: {where} has no {field!r} field of text or a number (got {type(value).__name__}: "
                  f"{str(value)[:40]}); set --{flag}")


def read_examples(source: TaskSource, stats: dict | None = None) -> list[tuple[str, str]]:
    """(prefix + input, target) pairs in file order. A malformed line or row is an error naming the
    file and line (row), or with source.skip_bad_lines is skipped and counted in stats['skipped']."""
    path = source.path
    if path.startswith("hf:") or os.path.isdir(path):
        ds = _load_hf(path) if path.startswith("hf:") else _load_from_disk(path)
        rows = _column_rows(path, source, ds.column_names, lambda c: list(ds[c]))
    else:
        _check_exists(path)
        ext = os.path.splitext(path)[1].lower()
        if ext == ".jsonl":
            rows = _jsonl_rows(path, source)
        elif ext in (".csv", ".tsv"):
            rows = _csv_rows(path, source, "\t" if ext == ".tsv" else ",")
        elif ext == ".parquet":
            table = _read_parquet(path)
            rows = _column_rows(path, source, table.column_names, lambda c: table.column(c).to_pylist())
        else:
            raise ValueError(f"{path}: unknown task file type {ext or '(no extension)'!r}; expected one of "
                             f"{', '.join(EXTENSIONS)}, a datasets save_to_disk directory, or hf:NAME[@SPLIT]")
    out, skipped = [], 0
    for row in rows:  # (input, target) or the BadLine that stands for a malformed line
        if isinstance(row, BadLine):
            if not source.skip_bad_lines:
                raise BadLine(f"{row}; fix it or pass --skip-bad-lines")
            skipped += 1
        else:
            out.append((source.prefix + row[0], row[1]))
    if stats is not None:
        stats["skipped"] = stats.get("skipped", 0) + skipped
    return out


def _read_parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install 't5kit[data]')") from None
    try:
        return pq.read_table(path)
    except Exception as e:  # pyarrow's ArrowInvalid, OSError, ...
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None


def utf8_lines(path: str) -> Iterator[str | BadLine]:
    """The file's lines split at b"\n" (as JSONL defines them; endings kept), a line that is not
    UTF-8 as a BadLine naming its line and byte offset; a leading byte-order mark is dropped."""
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
                yield text.removeprefix("\ufeff") if n == 1 else text  # as spreadsheet exports write
            except UnicodeDecodeError as e:
                yield BadLine(f"{path}: line {n} is not UTF-8 (byte offset {offset + e.start})")
            offset += len(raw)


def _jsonl_rows(path: str, source: TaskSource) -> Iterator[tuple[str, str] | BadLine]:
    for n, line in enumerate(utf8_lines(path), 1):
        if isinstance(line, BadLine):
            yield line
        elif line.strip():
            yield _jsonl_pair(path, n, line, source)


def _jsonl_pair(path: str, n: int, line: str, source: TaskSource) -> tuple[str, str] | BadLine:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, int too long, nesting too deep
        return BadLine(f"{path}: line {n} is not a JSON object ({str(e)[:80]})")
    if not isinstance(obj, dict):
        return BadLine(f"{path}: line {n} is not a JSON object (got {type(obj).__name__})")
    pair = []
    for field, flag in ((source.input_field, "input-field"), (source.target_field, "target-field")):
        if field not in obj:
            keys = ", ".join(map(str, list(obj)[:20]))
            return BadLine(f"{path}: line {n} has no {field!r} field (keys: {keys}); set --{flag}")
        try:
            pair.append(_text(path, f"line {n}", field, obj[field], flag))
        except BadLine as e:
            return e
    return pair[0], pair[1]


def _csv_rows(path: str, source: TaskSource, delimiter: str) -> Iterator[tuple[str, str] | BadLine]:
    bad = []  # lines that are not UTF-8 reach the csv reader blank, and come out here instead

    def text_lines():
        for line in utf8_lines(path):
            if isinstance(line, BadLine):
                bad.append(line)
                line = "\n"
            yield line

    kind = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.reader(text_lines(), delimiter=delimiter)
    try:
        header = next(reader, None)
        if bad:
            raise ValueError(f"{bad[0]}; the header row must be readable")
        if header is None:
            raise ValueError(f"{path}: empty file; expected a header row naming the columns")
        cols = []
        for field, flag in ((source.input_field, "input-field"), (source.target_field, "target-field")):
            if field not in header:
                raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(header)}); set --{flag}")
            cols.append(header.index(field))
        for row in reader:
            yield from bad
            bad.clear()
            if not row:  # blank line
                continue
            if len(row) != len(header):
                yield BadLine(f"{path}: line {reader.line_num} has {len(row)} cells, the header has {len(header)}")
                continue
            yield row[cols[0]], row[cols[1]]
        yield from bad
    except csv.Error as e:  # e.g. a field over the csv module's size limit; the reader cannot go on
        raise ValueError(f"{path}: line {reader.line_num} is not valid {kind} ({e})") from None


def _column_rows(path: str, source: TaskSource, columns: list[str], get) -> Iterator[tuple[str, str] | BadLine]:
    """Rows of a columnar source (parquet, datasets); `get(column)` -> list of values."""
    values = []
    for field, flag in ((source.input_field, "input-field"), (source.target_field, "target-field")):
        if field not in columns:
            raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(columns)}); set --{flag}")
        values.append(get(field))
    for r, (i, t) in enumerate(zip(*values), 1):
        try:
            yield (_text(path, f"row {r}", source.input_field, i, "input-field"),
                   _text(path, f"row {r}", source.target_field, t, "target-field"))
        except BadLine as e:
            yield e


def _datasets(path: str):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path}: needs the `datasets` package (pip install 't5kit[data]')") from None
    return datasets


def _load_hf(spec: str):
    """"hf:NAME[@SPLIT]" -> datasets.load_dataset(NAME, split=SPLIT or "train")."""
    datasets = _datasets(spec)
    name, _, split = spec[3:].partition("@")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as e:
        raise ValueError(f"{spec}: could not load the dataset ({e})") from e


def _load_from_disk(path: str):
    datasets = _datasets(path)
    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise ValueError(f"{path}: not a datasets save_to_disk directory ({e})") from None
    if isinstance(ds, datasets.DatasetDict):  # a dict of splits: the train split, or the only one
        if "train" not in ds and len(ds) != 1:
            raise ValueError(f"{path}: holds splits {', '.join(ds)}; expected 'train' or a single split")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    return ds


# ---- tokenization with a cache ----

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
    _check_exists(path)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    return [[os.path.abspath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]


def _truncate(ids: list[int], n: int, eos: int) -> tuple[np.ndarray, bool]:
    """Keep the first n - 1 tokens and the EOS (as Tokenizer.encode_batch)."""
    if len(ids) <= n:
        return np.asarray(ids, np.int32), False
    return np.asarray(ids[:n - 1] + [eos], np.int32), True


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
        ids, cut = _truncate(tok.encode(text), max_input_length, tok.eos_id)
        inputs.append(ids)
        n_in += cut
        ids, cut = _truncate(tok.encode(target), max_target_length, tok.eos_id)
        targets.append(ids)
        n_tg += cut
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


# ---- mixtures ----

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


# ---- batches ----

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


class TaskBatches:
    """Iterator over training batches of one task or a mixture of tasks; state()/load_state() resume exactly.

    Example stream: draw d picks a task with the mixing `rates` (default: examples-proportional),
    from a Generator seeded by (seed, d // 1024); each task walks its own permutation per epoch,
    seeded by (seed, task, epoch). The stream is cut into chunks of global batches:
      pack=False: bucket_batches * batch_size * world examples, sorted by (input length, target
        length), cut into batches, and the batch order shuffled with a Generator seeded by
        (seed, chunk) -- length bucketing, so little padding; shapes vary per batch.
      pack=True: `world` batches of fixed shape (B, inputs_length) / (B, targets_length), each example
        going into the first row with room (first-fit, as data.SpanCorruptionBatches).
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

    def reshard(self, states: list[dict], rank: int) -> tuple[dict, int]:
        """The state to resume with from the (equal) states a checkpoint saved for len(states)
        data-parallel ranks, and how many examples the change of rank count skips. A chunk is cut
        for a rank count, so a chunk begun under another count is left at its end (exact when
        every batch of it was taken, the rule in packed mode) and the next starts fresh here."""
        if len(states) == self.world:
            return states[rank], 0
        state = states[0]
        if int(state["batch"]) == 0:
            return state, 0
        old = copy.copy(self)
        old.world, old.rank, old._perms = len(states), 0, {}
        old.load_state(state)
        old._make_chunk()
        left = len(old._mine) - int(state["batch"])
        end = old._end
        return ({"chunk": int(state["chunk"]) + 1, "batch": 0, "draw": end["draw"], "epochs": end["epochs"],
                 "positions": end["positions"]}, sum(len(r) for b in old._mine[-left:] for r in b) * old.world
                if left else 0)

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
        """Examples in stream order, each into the first row with room; when the batch is full,
        the example that does not fit opens the next batch (stays in the stream)."""
        rows: list[list[tuple[int, int]]] = []
        used: list[list[int]] = []  # per row: [input tokens, target tokens]
        while True:
            p = self._peek(st)
            a, b = self.in_len[p[0]][p[1]], self.tg_len[p[0]][p[1]]
            r = next((k for k, (x, y) in enumerate(used) if x + a <= self.shape[0] and y + b <= self.shape[1]), None)
            if r is None and len(rows) == self.batch_size:
                return rows
            if r is None:
                rows.append([])
                used.append([0, 0])
                r = len(rows) - 1
            rows[r].append(p[:2])
            used[r][0] += a
            used[r][1] += b
            self._advance(st, p)

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

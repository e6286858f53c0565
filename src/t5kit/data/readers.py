"""Readers: lines of (compressed) files as text, and task files, with malformed lines named by
file and line. Corpora for pretraining are read in corpus.py over `utf8_lines` and `BadLine`.

Task files (`read_examples`, for fine-tuning and evaluation) give (input, target) pairs: .jsonl /
.csv / .tsv / .parquet files, a `datasets` save_to_disk directory, or "hf:NAME[@SPLIT]". A spec
"FILE:PREFIX" prepends PREFIX to every input ("translate English to French: ", T5 paper section 2.4).

A line that is not UTF-8, not a JSON object, lacks a field, holds null or a non-string where text
belongs, or (CSV) holds a field over the csv module's limit is a `BadLine`: an error naming the
file and line (row), or with --skip-bad-lines a skipped, counted line. A corrupt or truncated .gz /
.zst file cannot be read past the damage: it is always an error, naming the last line read.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

EXTENSIONS = (".jsonl", ".csv", ".tsv", ".parquet")
COMPRESSIONS = (".gz", ".zst")


class BadLine(ValueError):
    """A malformed line or row: an error, or with TaskSource.skip_bad_lines skipped and counted."""


def _zstd_chunks(path: str, size: int = 1 << 20) -> Iterator[bytes]:
    """A .zst file's decompressed bytes, frame after frame (zstd's own stream reader ends quietly
    on a truncated frame, so frames are followed here and an unfinished one is an error)."""
    try:
        import zstandard
    except ImportError:
        raise ValueError(f"{path}: reading .zst needs zstandard (pip install 't5kit[data]')") from None
    dctx = zstandard.ZstdDecompressor()
    with open(path, "rb") as f:
        obj, fed = dctx.decompressobj(), False
        while data := f.read(size):
            while data:
                out = obj.decompress(data)
                fed = True
                if out:
                    yield out
                data = b""
                if obj.eof:  # the next frame starts in what this one left over
                    data, obj, fed = obj.unused_data, dctx.decompressobj(), False
        if fed and not obj.eof:
            raise EOFError("the file ends inside a zstd frame")


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    buf, scanned = bytearray(), 0
    for chunk in chunks:
        buf += chunk
        start = 0
        while (end := buf.find(b"\n", scanned)) != -1:
            yield bytes(buf[start:end + 1])
            start = scanned = end + 1
        del buf[:start]
        scanned = len(buf)
    if buf:
        yield bytes(buf)


def _binary_lines(path: str) -> Iterator[bytes]:
    if path.endswith(".zst"):
        yield from _split_lines(_zstd_chunks(path))
    else:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            yield from f


def _decompression_errors() -> tuple:
    errors = [EOFError, zlib.error, gzip.BadGzipFile]
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def utf8_lines(path: str) -> Iterator[str | BadLine]:
    """The file's lines split at b"\n" (as JSONL defines them; endings kept), a line that is not
    UTF-8 as a BadLine naming its line and byte offset; a leading byte-order mark is dropped.
    .gz and .zst files are decompressed; damage in them is a ValueError naming the line reached."""
    offset, n, lines = 0, 0, _binary_lines(path)
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            return
        except _decompression_errors() as e:
            raise ValueError(f"{path}: corrupt or truncated {os.path.splitext(path)[1]} file: it breaks off after "
                             f"line {n} ({e})") from None
        n += 1
        try:
            text = raw.decode("utf-8")
            yield text.removeprefix("\ufeff") if n == 1 else text  # as spreadsheet exports write
        except UnicodeDecodeError as e:
            yield BadLine(f"{path}: line {n} is not UTF-8 (byte offset {offset + e.start})")
        offset += len(raw)


def utf8_text(path: str, where: str, field: str, value: str) -> str:
    """value, unless it holds a lone surrogate escape such as "\ud800" (valid JSON, not text)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadLine(f"{path}: {where} field {field!r} holds an unpaired surrogate escape, which is not text") \
            from None
    return value


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


def check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: task file not found")


def _text(path: str, where: str, field: str, value, flag: str) -> str:
    """A field's value as text: strings as they are, numbers as str; anything else is a bad line."""
    if isinstance(value, str):
        return utf8_text(path, where, field, value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise BadLine(f"{path}: {where} has no {field!r} field of text or a number (got {type(value).__name__}: "
                  f"{str(value)[:40]}); set --{flag}")


def _targets(path: str, where: str, field: str, value, flag: str) -> str | list[str]:
    """A target: text as `_text` reads it, or a non-empty list of such texts (several references,
    as SQuAD's answers or a multi-reference translation set: BLEU, chrF and ROUGE use them all,
    training the first)."""
    if not isinstance(value, (list, tuple)):
        return _text(path, where, field, value, flag)
    if not value:
        raise BadLine(f"{path}: {where} field {field!r} is an empty list; expected a text or a list of texts")
    return [_text(path, f"{where} item {k}", field, v, flag) for k, v in enumerate(value)]


def read_examples(source: TaskSource, stats: dict | None = None) -> list[tuple[str, str | list[str]]]:
    """(prefix + input, target) pairs in file order; a target that is a JSON array or a list cell
    is a list of references. A malformed line or row is an error naming the
    file and line (row), or with source.skip_bad_lines is skipped and counted in stats['skipped']."""
    path = source.path
    if path.startswith("hf:") or os.path.isdir(path):
        ds = _load_hf(path) if path.startswith("hf:") else _load_from_disk(path)
        rows = _column_rows(path, source, ds.column_names, lambda c: list(ds[c]))
    else:
        check_exists(path)
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
    for field, flag, read in ((source.input_field, "input-field", _text),
                              (source.target_field, "target-field", _targets)):
        if field not in obj:
            keys = ", ".join(map(str, list(obj)[:20]))
            return BadLine(f"{path}: line {n} has no {field!r} field (keys: {keys}); set --{flag}")
        try:
            pair.append(read(path, f"line {n}", field, obj[field], flag))
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
    except csv.Error as e:  # e.g. a header field over the csv module's size limit
        raise ValueError(f"{path}: line {reader.line_num} is not valid {kind} ({e})") from None
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # a field over the csv module's size limit: the reader resumes at the next line
            yield from bad
            bad.clear()
            yield BadLine(f"{path}: line {reader.line_num} is not valid {kind} ({e})")
            continue
        yield from bad
        bad.clear()
        if not row:  # blank line
            continue
        if len(row) != len(header):
            yield BadLine(f"{path}: line {reader.line_num} has {len(row)} cells, the header has {len(header)}")
            continue
        yield row[cols[0]], row[cols[1]]
    yield from bad


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
                   _targets(path, f"row {r}", source.target_field, t, "target-field"))
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

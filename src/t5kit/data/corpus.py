"""Corpora for pretraining as documents (`expand_inputs`, `iter_documents`, for the tokenizer and
the token store): files, directories and glob patterns, expanded in sorted order; .txt (one
document per line), .jsonl / .json (JSON lines with a text field), each also as .gz (stdlib gzip)
or .zst (`zstandard`), and .parquet read in record batches with pyarrow. C4 as published
(`c4-train.00000-of-01024.json.gz`, lines {"text", "timestamp", "url"}) and the Pile (`.jsonl.zst`)
read as they are. Bad lines follow readers.py's rules (`BadLine`): named, or skipped and counted.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

from .readers import COMPRESSIONS, BadLine, utf8_lines, utf8_text

CORPUS_EXTENSIONS = (".txt", ".jsonl", ".json", ".parquet")


def corpus_format(path: str) -> str:
    """'txt', 'jsonl' or 'parquet' for a corpus file, by its extension under .gz / .zst; a file of
    another extension is read as text, one document per line."""
    base = path.lower()
    for c in COMPRESSIONS:
        base = base.removesuffix(c)
    if base.endswith((".jsonl", ".json")):
        return "jsonl"
    if base.endswith(".parquet"):
        if base != path.lower():
            raise ValueError(f"{path}: compressed parquet is not read (parquet compresses its own pages)")
        return "parquet"
    return "txt"


def _is_corpus_file(path: str) -> bool:
    name = os.path.basename(path)
    if name == "header.json" or name.endswith(".t5kit.json"):  # t5kit's own notes beside a store, not text
        return False
    base = path.lower()
    for c in COMPRESSIONS:
        base = base.removesuffix(c)
    return base.endswith(CORPUS_EXTENSIONS) and os.path.isfile(path)


def expand_inputs(specs: list[str]) -> list[str]:
    """Corpus files from files, directories (their corpus files, recursively) and glob patterns
    (`*`, `?`, `[...]`, `**`: quoted ones are expanded here, as the shell would), each in sorted order.

    A spec that matches nothing is a FileNotFoundError naming it."""
    if not specs:
        raise ValueError("no corpus files given (--data-path / --input)")
    out = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(os.path.join(d, f) for d, _, files in os.walk(spec) for f in files
                           if _is_corpus_file(os.path.join(d, f)))
            what = f"{spec}: a directory with no corpus file ({', '.join(CORPUS_EXTENSIONS)}, optionally .gz / .zst)"
        elif os.path.isfile(spec):
            found, what = [spec], ""
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            what = f"{spec}: no file matches this pattern"
        else:
            found, what = [], f"{spec}: corpus file not found"
        if not found:
            raise FileNotFoundError(what)
        out.extend(found)
    return out


def _document(path: str, where: str, obj, text_field: str) -> str | BadLine:
    if not isinstance(obj, dict):
        return BadLine(f"{path}: {where} is not a JSON object (got {type(obj).__name__})")
    if text_field not in obj:
        return BadLine(f"{path}: {where} has no {text_field!r} field (keys: {', '.join(map(str, list(obj)[:20]))}); "
                       f"set --text-field")
    return _text_value(path, where, text_field, obj[text_field])


def _text_value(path: str, where: str, field: str, value) -> str | BadLine:
    """A document's text: a string; null or anything else is a bad line (returned, not raised)."""
    if not isinstance(value, str):
        got = "null" if value is None else f"{type(value).__name__} {str(value)[:40]}"
        return BadLine(f"{path}: {where} field {field!r} is {got}, not a string")
    try:
        return utf8_text(path, where, field, value)
    except BadLine as e:
        return e


def _parquet_documents(path: str, text_field: str, batch_rows: int = 1024) -> Iterator[str | BadLine]:
    """A parquet file's text column, record batch by record batch (never the whole file)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install 't5kit[data]')") from None
    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError, pa.ArrowException) as e:  # ArrowInvalid is a ValueError
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); set --text-field")
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield _text_value(path, f"row {row}", text_field, value)


def _raw_documents(path: str, text_field: str) -> Iterator[str | BadLine]:
    kind = corpus_format(path)
    if kind == "parquet":
        yield from _parquet_documents(path, text_field)
        return
    for n, line in enumerate(utf8_lines(path), 1):
        if isinstance(line, BadLine) or kind == "txt":
            yield line.rstrip("\r\n") if isinstance(line, str) else line
        elif line.strip():
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as e:  # JSONDecodeError, int too long, nesting too deep
                yield BadLine(f"{path}: line {n} is not a JSON object ({str(e)[:80]})")
                continue
            yield _document(path, f"line {n}", obj, text_field)


def iter_documents(path: str, skip_bad_lines: bool = False, text_field: str = "text",
                   stats: dict | None = None) -> Iterator[str]:
    """The non-blank documents of one corpus file (see the module's docstring for the formats). A
    bad line is an error naming the file and line, or with skip_bad_lines is counted in
    stats['skipped'] and skipped."""
    for doc in _raw_documents(path, text_field):
        if isinstance(doc, BadLine):
            if not skip_bad_lines:
                raise ValueError(f"{doc}; fix the file or pass --skip-bad-lines")
            if stats is not None:
                stats["skipped"] = stats.get("skipped", 0) + 1
        elif doc.strip():
            yield doc


def check_files(paths: list[str]) -> None:
    if not paths:
        raise ValueError("no corpus files given (--data-path)")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: corpus file not found")
        corpus_format(p)


def check_corpus(paths: list[str], skip_bad_lines: bool = False, text_field: str = "text") -> int:
    """Read every document once before any heavy work (tokenizer training, tokenization), so a
    missing file, an empty corpus, a bad line or a damaged .gz / .zst is reported by file and line
    rather than by SentencePiece. -> number of documents."""
    check_files(paths)
    n = sum(1 for p in paths for _ in iter_documents(p, skip_bad_lines, text_field))
    if n == 0:
        raise ValueError(f"empty corpus: no text in {', '.join(paths)}")
    return n

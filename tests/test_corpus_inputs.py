"""Issue 18: corpora as people bring them (files, directories, globs; .txt / .jsonl / .json, .gz,
.zst; parquet in record batches; C4's shards as published), bad lines named or counted, damaged
compressed files named with the line reached, and what --drop-remainders and resharding drop."""

import gzip
import json

import numpy as np
import pytest
from test_pretrain import _pretrain_args, corpus  # noqa: F401  (corpus is a fixture)

from t5kit.cli import main
from t5kit.data.pretraining import DataConfig, SpanCorruptionBatches
from t5kit.data.corpus import expand_inputs, iter_documents
from t5kit.data.readers import TaskSource, read_examples
from t5kit.data.spans import random_spans_helper
from t5kit.data.store import build_token_store, open_store
from t5kit.data.tokenizer import Tokenizer

TEXTS = [f"document {i} in the beginning god created heaven and earth" for i in range(30)]


def _c4_line(text, i):
    return json.dumps({"text": text, "timestamp": f"2019-04-{i % 28 + 1:02d}T10:00:00Z", "url": f"https://x/{i}"})


def write_c4(folder, texts, shards=3):
    """C4's English split as published: c4-train.NNNNN-of-NNNNN.json.gz, JSON lines."""
    folder.mkdir(exist_ok=True)
    for s in range(shards):
        lines = [_c4_line(t, i) for i, t in enumerate(texts) if i % shards == s]
        with gzip.open(folder / f"c4-train.{s:05d}-of-{shards:05d}.json.gz", "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


def test_c4_shards_by_glob_read_as_published(tmp_path, corpus):  # noqa: F811
    write_c4(tmp_path / "en", TEXTS)
    pattern = str(tmp_path / "en" / "c4-train.*-of-00003.json.gz")
    files = expand_inputs([pattern])
    assert [f.split("/")[-1] for f in files] == [f"c4-train.{s:05d}-of-00003.json.gz" for s in range(3)]
    (tmp_path / "en" / "header.json").write_text("{}")  # a store's header or notes in the folder are not text
    (tmp_path / "en" / "x.t5kit.json").write_text("{}")
    assert expand_inputs([str(tmp_path / "en")]) == files  # a directory: its corpus files, sorted
    want = [t for s in range(3) for i, t in enumerate(TEXTS) if i % 3 == s]
    assert [d for f in files for d in iter_documents(f)] == want
    # the quoted glob through the CLI, and the store holds exactly the documents' tokens
    assert main(["preprocess", "--input", pattern, "--tokenizer", str(corpus / "tok"), "--out",
                 str(tmp_path / "s")]) == 0
    tok = Tokenizer.from_pretrained(corpus / "tok")
    store = open_store(str(tmp_path / "s"))
    assert store.tokens.tolist() == [i for t in want for i in tok.encode(t, add_eos=False)]
    with pytest.raises(FileNotFoundError, match=r"c4-validation\.\*: no file matches this pattern"):
        expand_inputs([str(tmp_path / "en" / "c4-validation.*")])


def test_zst_and_json_and_text_field(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    lines = [json.dumps({"content": t, "meta": {}}) + "\n" for t in TEXTS]
    frames = zstandard.ZstdCompressor().compress("".join(lines[:10]).encode()) + \
        zstandard.ZstdCompressor().compress("".join(lines[10:]).encode())  # two frames, as zstd -T writes
    (tmp_path / "pile.jsonl.zst").write_bytes(frames)
    assert list(iter_documents(str(tmp_path / "pile.jsonl.zst"), text_field="content")) == TEXTS
    (tmp_path / "p.json").write_text("".join(lines))
    assert list(iter_documents(str(tmp_path / "p.json"), text_field="content")) == TEXTS
    with pytest.raises(ValueError, match=r"p.json: line 1 has no 'text' field \(keys: content, meta\); set "
                                         r"--text-field"):
        list(iter_documents(str(tmp_path / "p.json")))
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress("\n".join(TEXTS).encode()))
    assert list(iter_documents(str(tmp_path / "t.txt.gz"))) == TEXTS


def test_damaged_compressed_files_name_the_line_reached(tmp_path, corpus, capsys):  # noqa: F811
    zstandard = pytest.importorskip("zstandard")
    blob = ("\n".join(f"line {i} " + "x" * 50 for i in range(2000)) + "\n").encode()
    gz = gzip.compress(blob)
    (tmp_path / "cut.txt.gz").write_bytes(gz[:len(gz) // 2])
    (tmp_path / "bad.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    zst = zstandard.ZstdCompressor().compress(blob)
    (tmp_path / "cut.jsonl.zst").write_bytes(zst[:len(zst) // 2])
    for name, message in (("cut.txt.gz", r"cut.txt.gz: corrupt or truncated .gz file: it breaks off after line "),
                          ("bad.jsonl.gz", r"bad.jsonl.gz: corrupt or truncated .gz file: it breaks off after line 0"),
                          ("cut.jsonl.zst", r"cut.jsonl.zst: corrupt or truncated .zst file: it breaks off after line")):
        with pytest.raises(ValueError, match=message):
            list(iter_documents(str(tmp_path / name), skip_bad_lines=True))  # damage is never skipped
        assert main(["preprocess", "--input", str(tmp_path / name), "--tokenizer", str(corpus / "tok"), "--out",
                     str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert name in err and "breaks off after line" in err and "Traceback" not in err
    with pytest.raises(ValueError) as e:
        list(iter_documents(str(tmp_path / "cut.txt.gz")))
    assert 0 < int(str(e.value).split("after line ")[1].split()[0]) < 2000  # the line reached, not the file's end


def test_parquet_in_record_batches_with_bad_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    texts = [f"row {i}" for i in range(3000)]
    texts[1500], texts[2999] = None, None
    pq.write_table(pa.table({"body": texts, "n": list(range(3000))}), tmp_path / "c.parquet", row_group_size=700)
    with pytest.raises(ValueError, match=r"c.parquet: row 1501 field 'body' is null, not a string"):
        list(iter_documents(str(tmp_path / "c.parquet"), text_field="body"))
    stats = {}
    docs = list(iter_documents(str(tmp_path / "c.parquet"), True, "body", stats))
    assert docs == [t for t in texts if t is not None] and stats == {"skipped": 2}
    with pytest.raises(ValueError, match=r"row 1 field 'n' is int 0, not a string"):
        list(iter_documents(str(tmp_path / "c.parquet"), text_field="n"))
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: body, n\); set --text-field"):
        list(iter_documents(str(tmp_path / "c.parquet")))


def test_jsonl_null_or_non_string_text_is_a_bad_line(tmp_path, corpus):  # noqa: F811
    rows = [{"text": "good one"}, {"text": None}, {"text": 7}, {"text": ["a"]}, {"text": "\ud800"}, {"text": "good two"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"c.jsonl: line 2 field 'text' is null, not a string; fix the file or pass "
                                         r"--skip-bad-lines"):
        list(iter_documents(str(tmp_path / "c.jsonl")))
    tok = Tokenizer.from_pretrained(corpus / "tok")
    header = build_token_store([str(tmp_path / "c.jsonl")], tok, str(tmp_path / "s"), skip_bad_lines=True,
                               progress=False)
    assert (header["n_docs"], header["skipped_lines"]) == (2, 4)


def test_huge_csv_field_is_a_bad_line_named_or_skipped(tmp_path):
    (tmp_path / "t.csv").write_text("input,target\na,b\nx," + "y" * 200_000 + "\nc,d\n")
    with pytest.raises(ValueError, match=r"t.csv: line 3 is not valid CSV \(field larger than field limit"):
        read_examples(TaskSource(str(tmp_path / "t.csv")))
    stats = {}
    assert read_examples(TaskSource(str(tmp_path / "t.csv"), skip_bad_lines=True), stats) == [("a", "b"), ("c", "d")]
    assert stats == {"skipped": 1}


def test_workers_write_the_same_store(tmp_path, corpus):  # noqa: F811
    tok = Tokenizer.from_pretrained(corpus / "tok")
    one = build_token_store([str(corpus / "c.txt")], tok, str(tmp_path / "one"), progress=False)
    two = build_token_store([str(corpus / "c.txt")], tok, str(tmp_path / "two"), workers=2, progress=False)
    assert one == two
    a, b = open_store(str(tmp_path / "one")), open_store(str(tmp_path / "two"))
    assert (a.tokens == b.tokens).all() and (a.doc_offsets(np.arange(301)) == b.doc_offsets(np.arange(301))).all()


def test_drop_remainders_reports_what_it_drops(corpus, tmp_path, capsys):  # noqa: F811
    assert main(_pretrain_args(corpus, tmp_path / "d", 1, ["--drop-remainders", "--eval-interval", "0"])) == 0
    err = capsys.readouterr().err
    store = open_store(str(tmp_path / "d" / "data"))
    table = store.segments(random_spans_helper(32)[0], 0, 291)  # --split 969,30,1 of 300 documents
    n, tokens = table.remainders()
    assert n > 0 and f"--drop-remainders: {n:,} short group tails ({tokens:,} tokens" in err


def test_reshard_counts_the_tail_of_a_rank_on_an_older_epoch(tmp_path, corpus):  # noqa: F811
    tok = Tokenizer.from_pretrained(corpus / "tok")
    build_token_store([str(corpus / "c.txt")], tok, str(tmp_path / "s"), progress=False)
    segments = open_store(str(tmp_path / "s")).segments(random_spans_helper(32)[0])
    one = SpanCorruptionBatches(segments, DataConfig(inputs_length=32), tok.sentinel_id(0), 4)
    per_rank = [-(-(len(segments) - r) // 2) for r in (0, 1)]  # examples of rank r of 2 in an epoch
    # rank 0 has begun epoch 1 (3 read); rank 1 is 5 short of the end of epoch 0
    state, skipped, tokens = one.reshard([{"epoch": 1, "position": 3}, {"epoch": 0, "position": per_rank[1] - 5}])
    assert state == {"epoch": 1, "position": 5} and skipped == 5 + 2  # its tail, and the holes of epoch 1
    tail = [1 + 2 * p for p in range(per_rank[1] - 5, per_rank[1])]  # rank 1's unread positions of epoch 0
    order = [list(one._order(e, 0, 1)) for e in (0, 1)]
    unread = [order[0][j] for j in tail] + [order[1][j] for j in (1, 3)]
    assert tokens == int(segments[unread][:, 1].sum()) > 0

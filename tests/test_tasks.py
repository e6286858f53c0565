"""Text-to-text task data: readers and their errors, spec parsing, tokenization cache, mixture rates,
bucketed / packed / sharded batches that resume exactly, and property tests on arbitrary input."""

import csv
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from t5kit.data import task_cache
from t5kit.data.readers import TaskSource, parse_source, read_examples
from t5kit.data.task_cache import TokenizedTask, tokenize_task
from t5kit.data.tasks import TaskBatches, eval_batches, mixture_rates, resume_state
from t5kit.data.tokenizer import Tokenizer, train_tokenizer

WORDS = ("the cat sat on a mat while dog ran to big red house and bird sang in tree un chat le chien courait "
         "sept maison rouge oiseau chantait dans arbre quick brown fox jumps over lazy river morning evening "
         "light darkness water earth heaven garden king queen bread wine").split()
ROWS = [("a cat", "un chat"), ("the dog ran", "le chien courait"), ("7", "sept")]
PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(0)
    (d / "c.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(200)) + "\n")
    return train_tokenizer([str(d / "c.txt")], 60, str(d / "tok"))


def _write_jsonl(path, rows, fields=("src", "tgt")):
    path.write_text("".join(json.dumps({fields[0]: i, fields[1]: t, "id": n}) + "\n" for n, (i, t) in enumerate(rows)))
    return path


def _write_csv(path, rows, delimiter=",", fields=("src", "tgt")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(["id", fields[0], fields[1]])
        w.writerows([n, i, t] for n, (i, t) in enumerate(rows))
    return path


def _task(name, pairs, lo=3):
    """A TokenizedTask from lists of ids (EOS appended)."""
    arr = lambda ids: np.asarray(list(ids) + [1], np.int32)  # noqa: E731
    return TokenizedTask(name, [arr(i) for i, _ in pairs], [arr(t) for _, t in pairs], 0, 0)


def _random_task(name, n, seed, marker, max_in=20, max_tg=10):
    """Example k has inputs [marker, k, ...] so a batch row names its task and example."""
    rng = np.random.default_rng(seed)
    pairs = [([marker, 100 + k] + list(rng.integers(3, 50, rng.integers(0, max_in - 2))),
              list(rng.integers(3, 50, rng.integers(1, max_tg)))) for k in range(n)]
    return _task(name, pairs)


# ---- readers ----

def test_readers_with_prefix_and_custom_fields(tmp_path):
    want = [("go: " + i, t) for i, t in ROWS]
    files = [_write_jsonl(tmp_path / "a.jsonl", ROWS), _write_csv(tmp_path / "b.csv", ROWS),
             _write_csv(tmp_path / "c.tsv", ROWS, delimiter="\t")]
    for f in files:
        assert read_examples(TaskSource(str(f), "go: ", "src", "tgt")) == want, f
    # numbers become text; blank lines are skipped; a UTF-8 byte-order mark is ignored
    (tmp_path / "n.jsonl").write_text('\ufeff{"input": 7, "target": 2.5}\n\n{"input": "", "target": ""}\n')
    assert read_examples(TaskSource(str(tmp_path / "n.jsonl"))) == [("7", "2.5"), ("", "")]


def test_parquet_reader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"src": [i for i, _ in ROWS], "tgt": [t for _, t in ROWS], "n": [1, 2, 3]}),
                   tmp_path / "p.parquet")
    assert read_examples(TaskSource(str(tmp_path / "p.parquet"), "go: ", "src", "n")) == [
        ("go: " + i, str(k)) for k, (i, _) in enumerate(ROWS, 1)]
    with pytest.raises(ValueError, match=r"p.parquet: no column 'target' \(columns: src, tgt, n\); set --target-field"):
        read_examples(TaskSource(str(tmp_path / "p.parquet"), input_field="src"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: not a readable parquet file"):
        read_examples(TaskSource(str(tmp_path / "bad.parquet")))


def test_save_to_disk_reader(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"src": [i for i, _ in ROWS], "tgt": [t for _, t in ROWS]}).save_to_disk(tmp_path / "ds")
    assert read_examples(TaskSource(str(tmp_path / "ds"), "go: ", "src", "tgt")) == [("go: " + i, t) for i, t in ROWS]
    assert parse_source(f"{tmp_path / 'ds'}:go: ").prefix == "go: "


def test_hf_spec_without_datasets_says_what_to_install():
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed: hf: specs would go to the network")
    except ImportError:
        pass
    with pytest.raises(ValueError, match=r"hf:glue@train: needs the `datasets` package"):
        read_examples(parse_source("hf:glue@train:q: "))


@pytest.mark.parametrize("name, content, message", [
    ("a.jsonl", b'{"input": "a", "target": "b"}\n\n{"input": "\xff"}\n',
     r"a.jsonl: line 3 is not UTF-8 \(byte offset 42\)"),
    ("a.csv", b"input,target\nx,y\n\xfe,z\n", r"a.csv: line 3 is not UTF-8 \(byte offset 17\)"),
    ("a.jsonl", b'{"input": "a", "target": "b"}\n{"input": "a"\n', r"a.jsonl: line 2 is not a JSON object \(.+\)"),
    ("a.jsonl", b'{"input": "a", "target": "b"}\n["a", "b"]\n', r"a.jsonl: line 2 is not a JSON object \(got list\)"),
    ("a.jsonl", b'{"input": "a", "target": "b"}\n' + b"[" * 100000 + b"\n", r"a.jsonl: line 2 is not a JSON object"),
    ("a.jsonl", b'{"input": "a", "target": "b"}\n{"input": "a", "tgt": "b"}\n',
     r"a.jsonl: line 2 has no 'target' field \(keys: input, tgt\); set --target-field"),
    ("a.jsonl", b'{"input": "a", "target": "b"}\n{"input": ["a"], "target": "b"}\n',
     r"a.jsonl: line 2 has no 'input' field of text or a number \(got list.*set --input-field"),
    ("a.jsonl", b'{"input": null, "target": "b"}\n', r"a.jsonl: line 1 has no 'input' field of text"),
    ("a.jsonl", b'{"input": true, "target": "b"}\n', r"a.jsonl: line 1 has no 'input' field of text .*bool"),
    ("a.jsonl", b'{"input": "\\ud800", "target": "b"}\n', r"a.jsonl: line 1 field 'input' holds an unpaired surrogate"),
    ("a.csv", b"a,b\n1,2\n", r"a.csv: no column 'input' \(columns: a, b\); set --input-field"),
    ("a.tsv", b"input\tb\n1\t2\n", r"a.tsv: no column 'target' \(columns: input, b\); set --target-field"),
    ("a.csv", b"input,target\nx,y\nx,y,z\n", r"a.csv: line 3 has 3 cells, the header has 2"),
    ("a.tsv", b"input\ttarget\nx\ty\n\nx\n", r"a.tsv: line 4 has 1 cells, the header has 2"),
    ("a.csv", b"", r"a.csv: empty file; expected a header row"),
    ("a.csv", b"input,target\nx," + b"y" * 200_000 + b"\n", r"a.csv: line 2 is not valid CSV \(field larger"),
    ("a.txt", b"hello\n", r"a.txt: unknown task file type '.txt'; expected one of .jsonl, .csv, .tsv, .parquet"),
])
def test_reader_errors_name_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_examples(TaskSource(str(tmp_path / name)))


@pytest.mark.parametrize("name, content, n_bad", [
    ("b.jsonl", b'{"input": "a", "target": "b"}\n{"input": "\xff", "target": "b"}\n{"input": "c"\n'
                b'[1]\n{"input": "c", "tgt": "d"}\n{"input": null, "target": "b"}\n\n{"input": "e", "target": "f"}\n', 5),
    ("b.csv", b"input,target\na,b\n\xfe,z\nx,y,z\n\ne,f\n", 2),
])
def test_skip_bad_lines_keeps_the_good_ones_and_counts_the_rest(tmp_path, sp_tok, name, content, n_bad):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{name}: line \d+ .*; fix it or pass --skip-bad-lines"):
        read_examples(TaskSource(str(path)))
    stats = {}
    assert read_examples(TaskSource(str(path), "p: ", skip_bad_lines=True), stats) == [("p: a", "b"), ("p: e", "f")]
    assert stats == {"skipped": n_bad}
    for _ in range(2):  # tokenized, then from the cache: the count survives
        task = tokenize_task(TaskSource(str(path), skip_bad_lines=True), sp_tok, 8, 8, cache_dir=str(tmp_path / "c"))
        assert (len(task.inputs), task.n_skipped) == (2, n_bad)


def test_missing_file(tmp_path, sp_tok):
    missing = str(tmp_path / "nope.jsonl")
    for call in (lambda: read_examples(TaskSource(missing)),
                 lambda: tokenize_task(TaskSource(missing), sp_tok, 8, 8, cache_dir=str(tmp_path / "cache"))):
        with pytest.raises(FileNotFoundError, match=r"nope.jsonl: task file not found"):
            call()


def test_parse_source(tmp_path):
    f = _write_jsonl(tmp_path / "t.jsonl", ROWS)
    odd = tmp_path / "odd:name.csv"  # an existing path holding ':' is a path, with no prefix
    odd.write_text("input,target\n")
    assert parse_source(str(f)) == TaskSource(str(f), name="t")
    assert parse_source(str(f), prefix="p: ", input_field="src").prefix == "p: "
    s = parse_source(f"{f}:translate English to French: ", prefix="ignored: ", target_field="tgt")
    assert (s.path, s.prefix, s.target_field, s.name) == (str(f), "translate English to French: ", "tgt", "t")
    assert parse_source(f"{f}:a:b: c").prefix == "a:b: c"  # the prefix keeps its own ':'
    assert parse_source(str(odd)) == TaskSource(str(odd))
    assert parse_source(f"{odd}:q: ").path == str(odd) and parse_source(f"{odd}:q: ").prefix == "q: "
    assert parse_source("missing.tsv:x: y").path == "missing.tsv"  # known extension, not there (yet)
    assert parse_source("hf:glue@validation").path == "hf:glue@validation"
    assert parse_source("hf:org/squad@train:question: ") == TaskSource("hf:org/squad@train", "question: ", name="squad")
    assert parse_source(f"{tmp_path}:dir: ").path == str(tmp_path)
    assert parse_source("unknown:thing").path == "unknown:thing"  # then read_examples says it is not found
    with pytest.raises(ValueError, match="empty task spec"):
        parse_source("")


# ---- tokenization and its cache ----

def test_truncation_is_counted(tmp_path):
    tok = Tokenizer.byt5()  # one id per byte, so lengths are known
    f = _write_jsonl(tmp_path / "t.jsonl", [("abcdef", "xy"), ("ab", "vwxyz"), ("abc", "xyz")], ("input", "target"))
    task = tokenize_task(TaskSource(str(f), "p"), tok, max_input_length=5, max_target_length=4)
    assert task.name == "t" and len(task.inputs) == 3
    assert (task.n_truncated_inputs, task.n_truncated_targets) == (1, 1)  # "pabcdef" and "vwxyz"
    assert task.inputs[0].tolist() == tok.encode("pabc")  # the first 4 tokens and the EOS
    assert task.inputs[2].tolist() == tok.encode("pabc") and task.targets[2].tolist() == tok.encode("xyz")  # just fit
    assert task.targets[1].tolist() == tok.encode("vwx") and task.targets[0].tolist() == tok.encode("xy")
    assert all(x.dtype == np.int32 and x[-1] == 1 and len(x) <= 5 for x in task.inputs)
    with pytest.raises(ValueError, match="max_input_length=0"):
        tokenize_task(TaskSource(str(f)), tok, 0, 4)


def test_cache_is_reused_and_invalidated(tmp_path, sp_tok, monkeypatch):
    f = _write_jsonl(tmp_path / "t.jsonl", ROWS, ("input", "target"))
    cache = str(tmp_path / "cache")
    first = tokenize_task(TaskSource(str(f), "go: "), sp_tok, 16, 16, cache_dir=cache)
    assert len(os.listdir(cache)) == 1 and os.listdir(cache)[0].startswith("t-")

    def boom(source, stats=None):
        raise AssertionError("read the file")
    monkeypatch.setattr(task_cache, "read_examples", boom)
    again = tokenize_task(TaskSource(str(f), "go: "), sp_tok, 16, 16, cache_dir=cache)
    assert again.name == "t" and [x.tolist() for x in again.inputs] == [x.tolist() for x in first.inputs]
    assert [x.tolist() for x in again.targets] == [x.tolist() for x in first.targets]
    for other in (TaskSource(str(f), "other: "), TaskSource(str(f), "go: ", target_field="input")):
        with pytest.raises(AssertionError):  # a different prefix or field is another cache entry
            tokenize_task(other, sp_tok, 16, 16, cache_dir=cache)
    with pytest.raises(AssertionError):
        tokenize_task(TaskSource(str(f), "go: "), sp_tok, 16, 8, cache_dir=cache)
    with pytest.raises(AssertionError):
        tokenize_task(TaskSource(str(f), "go: "), Tokenizer.byt5(), 16, 16, cache_dir=cache)
    _write_jsonl(f, ROWS[:2], ("input", "target"))  # the file changes: size and mtime
    st_ = os.stat(f)
    os.utime(f, ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError):
        tokenize_task(TaskSource(str(f), "go: "), sp_tok, 16, 16, cache_dir=cache)
    monkeypatch.undo()
    changed = tokenize_task(TaskSource(str(f), "go: "), sp_tok, 16, 16, cache_dir=cache)
    assert len(changed.inputs) == 2
    (tmp_path / "cache" / os.listdir(cache)[0]).write_bytes(b"junk")  # an unreadable cache is rebuilt
    for _ in range(2):
        assert len(tokenize_task(TaskSource(str(f), "go: "), sp_tok, 16, 16, cache_dir=cache).inputs) == 2


# ---- mixtures ----

def test_mixture_rates_follow_the_formula():
    e = np.array([10, 1000, 50_000])
    assert np.allclose(mixture_rates(e), e / e.sum())
    k = np.minimum(e, 2000)
    assert np.allclose(mixture_rates(e, cap=2000), k / k.sum())
    for temp in (1.0, 2.0, 8.0):
        r = (k / k.sum()) ** (1 / temp)
        assert np.allclose(mixture_rates(e, "temperature", 2000, temp), r / r.sum())
    assert np.allclose(mixture_rates(e, "temperature", temperature=1e6), 1 / 3, atol=1e-4)  # -> equal mixing
    for kwargs, message in (({"mode": "equal"}, "mode 'equal'"), ({"cap": 0}, "cap 0"),
                            ({"cap": 2.5}, "cap 2.5"), ({"mode": "temperature", "temperature": 0}, "temperature 0"),
                            ({"temperature": 2.0}, "temperature 2.0 applies only")):
        with pytest.raises(ValueError, match=message):
            mixture_rates(e, **kwargs)
    with pytest.raises(ValueError, match="sizes"):
        mixture_rates([0, 0])


def test_mixture_frequencies_match_rates():
    ts = [_random_task(f"t{m}", n, m, 10 + m) for m, n in enumerate((40, 200, 900))]
    for rates in (mixture_rates([40, 200, 900]), mixture_rates([40, 200, 900], "temperature", temperature=3.0)):
        it = TaskBatches(ts, 50, rates=rates, seed=3, bucket_batches=8)
        counts = np.zeros(3)
        for _ in range(400):  # 20,000 draws: standard error of a frequency < 0.004
            counts += np.bincount(next(it)["input_ids"][:, 0] - 10, minlength=3)
        assert np.abs(counts / counts.sum() - rates).max() < 0.015, (counts / counts.sum(), rates)
    only = TaskBatches(ts, 10, rates=[0, 1, 0], bucket_batches=2)
    assert all((next(only)["input_ids"][:, 0] == 11).all() for _ in range(5))
    with pytest.raises(ValueError, match="task 'empty' has no examples"):
        TaskBatches([ts[0], _task("empty", [])], 4, rates=[1, 1])
    assert next(TaskBatches([ts[0], _task("empty", [])], 4))  # proportional: an empty task is never drawn


# ---- batches ----

def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _rows(batch):
    """(task marker, example number) of each row of an unpacked batch."""
    return [tuple(r) for r in batch["input_ids"][:, :2].tolist()]


@pytest.fixture(scope="module")
def mix():
    return [_random_task("a", 70, 0, 10), _random_task("b", 130, 1, 11)]


def test_batch_format(mix):
    b = next(TaskBatches(mix, 8, bucket_batches=3))
    assert set(b) == {"input_ids", "decoder_input_ids", "labels"} and all(v.dtype == np.int64 for v in b.values())
    for r in range(8):
        t, k = b["input_ids"][r, 0] - 10, b["input_ids"][r, 1] - 100
        inp, tgt = mix[t].inputs[k], mix[t].targets[k]
        assert b["input_ids"][r, :len(inp)].tolist() == inp.tolist() and (b["input_ids"][r, len(inp):] == 0).all()
        assert b["labels"][r, :len(tgt)].tolist() == tgt.tolist() and (b["labels"][r, len(tgt):] == -100).all()
        assert b["decoder_input_ids"][r, :len(tgt)].tolist() == [0] + tgt[:-1].tolist()
    assert b["input_ids"].shape[1] == max(int((row != 0).sum()) for row in b["input_ids"])  # padded to the longest


def test_deterministic_by_seed_and_resumes_mid_chunk(mix):
    for kw in ({"bucket_batches": 4}, {"bucket_batches": 3, "world": 2, "rank": 1},
               {"pack": True, "inputs_length": 48, "targets_length": 24}):
        a, b = TaskBatches(mix, 6, seed=5, **kw), TaskBatches(mix, 6, seed=5, **kw)
        run = [next(a) for _ in range(30)]  # several epochs of task a
        assert all(_same(x, next(b)) for x in run)
        assert not all(_same(x, y) for x, y in zip(run, TaskBatches(mix, 6, seed=6, **kw)))
        for stop in (0, 6, 13, 29):
            it = TaskBatches(mix, 6, seed=5, **kw)
            for _ in range(stop):
                next(it)
            state = json.loads(json.dumps(it.state()))
            assert set(state) == {"chunk", "batch", "draw", "epochs", "positions"}
            fresh = TaskBatches(mix, 6, seed=5, **kw)
            fresh.load_state(state)
            assert all(_same(x, next(fresh)) for x in run[stop:stop + 4]), (kw, stop)
    with pytest.raises(ValueError, match="state is for 1 task"):
        TaskBatches(mix, 6).load_state({"chunk": 0, "batch": 0, "draw": 0, "epochs": [0], "positions": [0]})


def test_single_task_walks_epoch_permutations(mix):
    it = TaskBatches(mix[:1], 10, bucket_batches=7)  # one chunk = 70 examples = one epoch
    seen = [row for _ in range(7) for row in _rows(next(it))]
    assert sorted(seen) == [(10, 100 + k) for k in range(70)]
    assert it.state()["positions"] == [0] and next(it) and it.state()["positions"] == [70]


def test_ranks_are_disjoint_and_together_the_one_rank_stream(mix):
    for kw in ({"bucket_batches": 3}, {"pack": True, "inputs_length": 40, "targets_length": 20}):
        one = TaskBatches(mix, 5, seed=1, **{**kw, "bucket_batches": kw.get("bucket_batches", 1) * 3})
        ranks = [TaskBatches(mix, 5, seed=1, rank=r, world=3, **kw) for r in range(3)]
        for step in range(12):
            got = [next(r) for r in ranks]
            assert all(_same(g, next(one)) for g in got), (kw, step)
            assert len({json.dumps(r.state()) for r in ranks}) == 1  # the same counters on every rank
    ranks = [TaskBatches(mix[:1], 5, rank=r, world=2, bucket_batches=7) for r in range(2)]
    halves = [[row for _ in range(7) for row in _rows(next(it))] for it in ranks]  # one epoch of 70
    assert not set(halves[0]) & set(halves[1]) and len(set(halves[0]) | set(halves[1])) == 70


def test_length_buckets_pad_less_than_random_batches():
    rng = np.random.default_rng(0)
    t = _task("t", [(rng.integers(3, 50, rng.integers(1, 120)), rng.integers(3, 50, rng.integers(1, 60)))
                    for _ in range(1000)])

    def pads(bucket_batches):
        it = TaskBatches([t], 16, bucket_batches=bucket_batches)
        batches = [next(it) for _ in range(60)]
        return sum(int((b["input_ids"] == 0).sum() + (b["labels"] == -100).sum()) for b in batches)
    assert pads(30) < 0.5 * pads(1)  # bucket_batches=1: one batch per chunk, i.e. random batches


def test_packed_rows_hold_whole_examples(mix):
    it = TaskBatches(mix, 4, pack=True, inputs_length=48, targets_length=24, seed=2)
    examples = {(tuple(i.tolist()), tuple(t.tolist())) for task in mix for i, t in zip(task.inputs, task.targets)}
    packed = 0
    for _ in range(25):
        b = next(it)
        assert b["input_ids"].shape == (4, 48) and b["labels"].shape == (4, 24)
        assert set(b) == {"input_ids", "decoder_input_ids", "labels", "segment_ids", "decoder_segment_ids"}
        for r in range(4):
            seg, dseg = b["segment_ids"][r], b["decoder_segment_ids"][r]
            n = int(seg.max())
            packed += n > 1
            assert dseg.max() == n and (np.diff(seg[seg > 0]) >= 0).all() and (seg[int((seg > 0).sum()):] == 0).all()
            for k in range(1, n + 1):
                ins, tgt = b["input_ids"][r][seg == k], b["labels"][r][dseg == k]
                assert (tuple(ins.tolist()), tuple(tgt.tolist())) in examples
                assert b["decoder_input_ids"][r][dseg == k].tolist() == [0] + tgt[:-1].tolist()
            assert (b["labels"][r][dseg == 0] == -100).all() and (b["input_ids"][r][seg == 0] == 0).all()
    assert packed > 20
    with pytest.raises(ValueError, match="longer than the packed rows"):
        TaskBatches(mix, 4, pack=True, inputs_length=8, targets_length=24)
    with pytest.raises(ValueError, match="needs inputs_length"):
        TaskBatches(mix, 4, pack=True)


def test_eval_batches_cover_every_example_once_in_order(mix):
    t = mix[1]
    batches = list(eval_batches(t, 16))
    assert [len(b["input_ids"]) for b in batches] == [16] * 8 + [2]
    got = [(row[row != 0].tolist(), lab[lab != -100].tolist())
           for b in batches for row, lab in zip(b["input_ids"], b["labels"])]
    assert got == [(i.tolist(), g.tolist()) for i, g in zip(t.inputs, t.targets)]
    assert all(b["decoder_input_ids"][:, 0].tolist() == [0] * len(b["input_ids"]) for b in batches)


def test_end_to_end_from_files(tmp_path, sp_tok):
    a = _write_jsonl(tmp_path / "copy.jsonl", [(" ".join(WORDS[i:i + 3]),) * 2 for i in range(15)])
    b = _write_csv(tmp_path / "rev.csv", [(w, w[::-1]) for w in WORDS])
    ts = [tokenize_task(parse_source(f"{p}:{p.stem}: ", input_field="src", target_field="tgt"), sp_tok, 12, 12,
                        cache_dir=str(tmp_path / "c")) for p in (a, b)]
    assert [t.name for t in ts] == ["copy", "rev"] and [len(t.inputs) for t in ts] == [15, len(WORDS)]
    it = TaskBatches(ts, 4, rates=mixture_rates([15, len(WORDS)]), bucket_batches=2)
    texts = sp_tok.decode_batch(next(it)["input_ids"])
    assert all(s.startswith(("copy", "rev")) for s in texts), texts


# ---- properties ----

@PROPERTY
@given(data=st.binary(max_size=400), ext=st.sampled_from([".jsonl", ".csv", ".tsv"]), header=st.booleans())
def test_arbitrary_bytes_give_examples_or_value_error(tmp_path_factory, data, ext, header):
    path = tmp_path_factory.getbasetemp() / f"fuzz{ext}"
    head = {".jsonl": b'{"input": "a", "target": "b"}\n', ".csv": b"input,target\n", ".tsv": b"input\ttarget\n"}[ext]
    path.write_bytes((head if header else b"") + data)
    try:
        out = read_examples(TaskSource(str(path), "p: "))
    except ValueError as e:
        assert "fuzz" in str(e)
    else:
        assert all(isinstance(i, str) and isinstance(t, str) and i.startswith("p: ") for i, t in out)


@PROPERTY
@given(text=st.text(max_size=200))
def test_encode_decode_never_raises(sp_tok, text):
    for tok in (sp_tok, Tokenizer.byt5()):
        ids = tok.encode(text)
        assert ids[-1] == 1 and all(0 <= i < tok.vocab_size for i in ids)
        assert isinstance(tok.decode(ids), str)
    if not any(s in text for s in ("<pad>", "</s>", "<unk>")):
        assert Tokenizer.byt5().decode(Tokenizer.byt5().encode(text)) == text


def test_reshard_to_fewer_ranks_continues_without_repeating(mix):
    """A checkpoint of 2 data-parallel ranks resumed by 1: packed (a chunk is one batch per rank,
    so the switch is exact: the 1-rank stream resumed at the same examples) and bucketed (the
    begun chunk is left at its end: nothing repeated, the skipped examples counted)."""
    for kw, exact in (({"pack": True, "inputs_length": 40, "targets_length": 20}, True), ({"bucket_batches": 3}, False)):
        two = [TaskBatches(mix, 5, seed=1, rank=r, world=2, **kw) for r in range(2)]
        seen = {row for _ in range(4) for it in two for row in _rows_any(next(it))}
        one = TaskBatches(mix, 5, seed=1, **kw)
        state, skipped, tokens = one.reshard([it.state() for it in two])
        assert (skipped == 0) == exact and (tokens == 0) == exact, (kw, skipped, tokens)
        one.load_state(state)
        after = [row for _ in range(6) for row in _rows_any(next(one))]
        assert not seen & set(after), kw
        if not exact:  # the begun chunk's untaken batches of both ranks, counted example by example
            left = [ex for it in two for b in it._mine[it.batch:] for row in b for ex in row]
            assert skipped == len(left)
            assert tokens == sum(len(mix[t].inputs[i]) + len(mix[t].targets[i]) for t, i in left)
        if exact:  # the same examples, in the same order, as 2 ranks would have read next
            more = [row for _ in range(3) for it in two for row in _rows_any(next(it))]
            assert sorted(more) == sorted(after)
    same = TaskBatches(mix, 5, seed=1, rank=1, world=2)
    assert resume_state(same, [{"a": 0}, {"b": 1}], 1) == ({"b": 1}, 0, 0)  # same rank count: each rank its own


def _rows_any(batch):
    """(task marker, example number) of every example of a batch, packed or not: each example's
    input starts with its task marker and number (_random_task), after EOS or at a row start."""
    out = []
    for row, seg in zip(batch["input_ids"].tolist(), batch.get("segment_ids", batch["input_ids"] != 0).tolist()):
        starts = [k for k in range(len(row)) if seg[k] and (k == 0 or seg[k] != seg[k - 1])]
        out += [(row[k], row[k + 1]) for k in starts]
    return out


def test_list_targets_are_several_references(tmp_path, sp_tok):
    """A JSON array (or list cell) target is a list of references; training tokenizes the first."""
    path = tmp_path / "qa.jsonl"
    path.write_text('{"input": "q1", "target": ["a b", "c"]}\n{"input": "q2", "target": "d"}\n')
    assert read_examples(TaskSource(str(path))) == [("q1", ["a b", "c"]), ("q2", "d")]
    task = tokenize_task(TaskSource(str(path)), sp_tok, 16, 16)
    assert task.targets[0].tolist() == sp_tok.encode("a b") and task.targets[1].tolist() == sp_tok.encode("d")
    path.write_text('{"input": "q1", "target": []}\n')
    with pytest.raises(ValueError, match="line 1 field 'target' is an empty list"):
        read_examples(TaskSource(str(path)))
    path.write_text('{"input": "q1", "target": ["a", null]}\n')
    with pytest.raises(ValueError, match="line 1 item 1 has no 'target' field of text"):
        read_examples(TaskSource(str(path)))

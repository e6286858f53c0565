"""Issue 18: Megatron-LM's indexed datasets (MMIDIDX .bin / .idx) read as token stores, written by
`t5kit preprocess --format megatron`, blended (`--data-path W1 P1 W2 P2`) and split (`--split`), and
every bad input named before training."""

import itertools
import json
import struct

import numpy as np
import pytest
from test_pretrain import WORDS, corpus  # noqa: F401  (corpus is a fixture)

from t5kit.cli import main
from t5kit.data.sources import Blend, parse_blend, parse_split, split_documents
from t5kit.data.store import MegatronStore, open_store
from t5kit.data.tokenizer import Tokenizer

CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def write_megatron(prefix, docs, dtype=np.uint16, sentences=1, version=1, magic=b"MMIDIDX\x00\x00", code=None):
    """Megatron's format as megatron/core/datasets/indexed_dataset.py writes it, written here from its
    description (not with t5kit's writer): each document is cut into `sentences` sequences, as
    preprocess_data.py --split-sentences does; pointers are byte offsets; document_indices start at 0."""
    lengths, doc_idx = [], [0]
    for doc in docs:
        cuts = np.array_split(np.asarray(doc), sentences)
        lengths += [len(c) for c in cuts if len(c)]
        doc_idx.append(len(lengths))
    size = np.dtype(dtype).itemsize
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * size if lengths else np.zeros(0)
    code = code or {np.dtype(t): c for c, t in CODES.items()}[np.dtype(dtype)]
    with open(f"{prefix}.idx", "wb") as f:
        f.write(magic + struct.pack("<Q", version) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_idx)))
        f.write(np.array(lengths, np.int32).tobytes() + np.array(pointers, np.int64).tobytes())
        f.write(np.array(doc_idx, np.int64).tobytes())
    with open(f"{prefix}.bin", "wb") as f:
        for doc in docs:
            f.write(np.asarray(doc, dtype).tobytes())


def documents(store):
    ends = store.doc_offsets(np.arange(store.n_docs + 1))
    return [store.tokens[a:b].tolist() for a, b in itertools.pairwise(ends)]


@pytest.mark.parametrize("code", sorted(CODES))
def test_every_dtype_code_reads_back_equal(tmp_path, code):
    rng = np.random.default_rng(code)
    docs = [rng.integers(0, 100, rng.integers(1, 50)).tolist() for _ in range(40)]
    write_megatron(tmp_path / "d", docs, CODES[code], sentences=3)
    store = open_store(str(tmp_path / "d"))
    assert isinstance(store, MegatronStore) and store.tokens.dtype == np.dtype(CODES[code])
    assert store.n_docs == 40 and documents(store) == docs
    if np.dtype(CODES[code]).kind == "f":
        with pytest.raises(ValueError, match="holds no token ids"):
            store.check_vocab(1000)
    else:
        store.check_vocab(100)
        assert store.segments(16).n_tokens() == sum(map(len, docs))


def test_preprocess_format_megatron_writes_megatrons_layout(corpus, tmp_path):  # noqa: F811
    """t5kit's writer against the layout read here by hand, and the same tokens as t5kit's store."""
    args = ["preprocess", "--input", str(corpus / "c.txt"), "--tokenizer", str(corpus / "tok")]
    assert main([*args, "--out", str(tmp_path / "m"), "--format", "megatron"]) == 0
    assert main([*args, "--out", str(tmp_path / "s")]) == 0
    idx = (tmp_path / "m.idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00" and struct.unpack("<QBQQ", idx[9:34]) == (1, 8, 300, 301)
    lengths = np.frombuffer(idx, np.int32, 300, 34)
    pointers = np.frombuffer(idx, np.int64, 300, 34 + 4 * 300)
    doc_idx = np.frombuffer(idx, np.int64, 301, 34 + 12 * 300)
    assert len(idx) == 34 + 12 * 300 + 8 * 301
    assert (pointers == np.concatenate([[0], np.cumsum(lengths)[:-1]]) * 2).all() and (doc_idx == np.arange(301)).all()
    ours = open_store(str(tmp_path / "s"))
    assert documents(open_store(str(tmp_path / "m"))) == documents(ours)
    notes = json.loads((tmp_path / "m.t5kit.json").read_text())  # unigram counted while preprocessing
    assert notes["unigram"] == ours.header["unigram"] and sum(notes["unigram"]) == ours.header["n_tokens"]


def test_split_has_megatrons_meaning():
    assert parse_split("969, 30, 1") == [0.969, 0.03, 0.001]
    assert parse_split("99,1") == [0.99, 0.01, 0.0]
    assert split_documents(1000, parse_split("969,30,1")) == [(0, 969), (969, 999), (999, 1000)]
    # Megatron rounds each book-end of the cumulative shares: 7 x 0.5 = 3.5 -> 4 (round half even: 4)
    assert split_documents(7, parse_split("1,1")) == [(0, 4), (4, 7), (7, 7)]
    assert split_documents(10, parse_split("8,1,1")) == [(0, 8), (8, 9), (9, 10)]
    for bad in ("", "a,b", "1,-1", "0,0", "1,2,3,4"):
        with pytest.raises(ValueError, match="--split"):
            parse_split(bad)


def test_split_parts_are_disjoint_documents(tmp_path):
    docs = [[i] * 10 for i in range(100)]  # document i is ten tokens of value i
    write_megatron(tmp_path / "d", docs)
    store = open_store(str(tmp_path / "d"))
    seen = []
    for (first, last), cut in zip(split_documents(100, parse_split("90,8,2")), ("train", "valid", "test")):
        table = store.segments(4, first, last)
        values = {int(v) for i in range(len(table)) for v in table.raw(i)}
        assert values == set(range(first, last)), cut
        seen.append(values)
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2])


def test_blend_proportions_and_determinism(tmp_path):
    write_megatron(tmp_path / "a", [[1] * 40] * 50)  # 500 segments of 4 tokens, all ones
    write_megatron(tmp_path / "b", [[2] * 40] * 10)  # 100 segments, all twos
    tables = [open_store(str(tmp_path / p)).segments(4) for p in "ab"]
    blend = Blend(tables, [0.3, 0.7], ["a", "b"], seed=5)
    assert len(blend) == 600 and blend.counts.tolist() == [180, 420]  # b read 4.2 times over, a subsampled
    from t5kit.data.sources import Permutation
    order = Permutation(len(blend), [5, 0])
    first = [int(blend.raw(order[i])[0]) for i in range(200)]
    assert 0.6 < first.count(2) / 200 < 0.8  # interleaved, not one corpus after the other
    whole = [int(blend.raw(i)[0]) for i in range(600)]
    assert whole.count(1) == 180 and whole.count(2) == 420
    a_picks = [blend.locate(i)[1] for i in range(180)]
    assert len(set(a_picks)) == 180  # a subsample without repeats
    again = Blend(tables, [3, 7], ["a", "b"], seed=5)  # weights are normalised
    assert [again.locate(i) for i in range(600)] == [blend.locate(i) for i in range(600)]
    other = Blend(tables, [3, 7], ["a", "b"], seed=6)
    assert [other.locate(i) for i in range(180)] != [blend.locate(i) for i in range(180)]


@pytest.mark.parametrize("items, message", [
    (["0.7", "a", "0.3"], "a blend is W1 P1 W2 P2 .* 3 items"),
    (["0.7", "a", "b", "c"], "'b' stands where a blend has a weight"),
    (["-1", "a", "2", "b"], "expected weights >= 0 with a positive total"),
    (["0", "a", "0", "b"], "expected weights >= 0 with a positive total"),
])
def test_bad_blends_are_named(items, message):
    with pytest.raises(ValueError, match=message):
        parse_blend(items)


def _pretrain(corpus, out, data, extra=()):  # noqa: F811
    return ["pretrain", "--data-path", *data, "--tokenizer", str(corpus / "tok"), "--model-preset", "tiny",
            "--seq-length", "32", "--micro-batch-size", "4", "--train-iters", "2", "--eval-interval", "1",
            "--eval-iters", "1", "--save", str(out), "--save-interval", "0", *extra]


def test_pretrain_on_a_megatron_blend(corpus, tmp_path, capsys):  # noqa: F811
    """A blend of a Megatron dataset (written by the test's writer) and t5kit's store: it trains and
    logs how many examples each corpus gives per epoch."""
    tok = Tokenizer.from_pretrained(corpus / "tok")
    rng = np.random.default_rng(0)
    docs = [tok.encode(" ".join(rng.choice(WORDS, 30)), add_eos=False) for _ in range(200)]
    write_megatron(tmp_path / "meg", docs, sentences=2)
    assert main(["preprocess", "--input", str(corpus / "c.txt"), "--tokenizer", str(corpus / "tok"), "--out",
                 str(tmp_path / "store")]) == 0
    capsys.readouterr()
    assert main(_pretrain(corpus, tmp_path / "run", ["0.25", str(tmp_path / "meg"), "0.75", str(tmp_path / "store")],
                          ["--split", "90,10"])) == 0
    err = capsys.readouterr().err
    assert f"blend, per epoch: {tmp_path / 'meg'}: weight 0.250" in err and "weight 0.750" in err
    assert "unigram baseline" in err and (tmp_path / "meg.t5kit.json").exists()  # the scan, cached beside it


def test_bad_megatron_files_are_named_before_training(corpus, tmp_path, capsys):  # noqa: F811
    good = [[5, 6, 7]] * 20
    cases = {
        "magic": ({"magic": b"NOTANIDX\x00"}, r"magic.idx: not a Megatron index \(expected the magic bytes"),
        "version": ({"version": 2}, r"version.idx: MMIDIDX version 2; t5kit reads version 1"),
        "dtype": ({"code": 9}, r"dtype.idx: unknown dtype code 9; expected one of 1 \(uint8\)"),
    }
    for name, (kw, message) in cases.items():
        write_megatron(tmp_path / name, good, **kw)
        assert main(_pretrain(corpus, tmp_path / f"run-{name}", [str(tmp_path / name)])) == 2
        import re
        assert re.search(message, capsys.readouterr().err), name
    write_megatron(tmp_path / "short", good)
    with open(tmp_path / "short.bin", "r+b") as f:
        f.truncate(100)
    assert main(_pretrain(corpus, tmp_path / "run-short", [str(tmp_path / "short")])) == 2
    assert "short.bin: 100 bytes, shorter than the 120 its index" in capsys.readouterr().err
    idx = (tmp_path / "short.idx").read_bytes()
    (tmp_path / "trunc.idx").write_bytes(idx[:-8])
    (tmp_path / "trunc.bin").write_bytes(b"\0" * 120)
    assert main(_pretrain(corpus, tmp_path / "run-trunc", [str(tmp_path / "trunc")])) == 2
    assert f"trunc.idx: {len(idx) - 8} bytes, but its header" in capsys.readouterr().err
    # a token id past the tokenizer's vocabulary, found by the start-up scan and cached beside the .bin
    vocab = len(Tokenizer.from_pretrained(corpus / "tok"))
    write_megatron(tmp_path / "big", [[5, 6, 7]] * 30 + [[5, vocab + 3, 7]] + [[5]] * 30)
    assert main(_pretrain(corpus, tmp_path / "run-big", [str(tmp_path / "big")])) == 2
    err = capsys.readouterr().err
    assert f"big.bin: token id {vocab + 3} (first at token 91) is at or past the tokenizer's vocabulary size {vocab}" \
        in err and "Traceback" not in err
    notes = json.loads((tmp_path / "big.t5kit.json").read_text())
    assert (notes["max_id"], notes["max_at"]) == (vocab + 3, 91)
    notes["max_id"] = 4  # the cache is what later starts read: with it edited, the same data passes the check
    (tmp_path / "big.t5kit.json").write_text(json.dumps(notes))
    open_store(str(tmp_path / "big")).check_vocab(vocab)
    with open(tmp_path / "big.bin", "ab") as f:  # a changed .bin invalidates the cache
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="token id"):
        open_store(str(tmp_path / "big")).check_vocab(vocab)
    for items, message in ((["0.5", str(tmp_path / "big"), "0.5"], "3 items"),
                           (["-1", str(tmp_path / "big"), "1", str(tmp_path / "big")], "weights >= 0")):
        assert main(_pretrain(corpus, tmp_path / "x", items)) == 2
        assert message in capsys.readouterr().err

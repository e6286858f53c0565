"""Tokenizer ids against transformers' T5 / ByT5 tokenizers, with a SentencePiece model trained here."""

import json
import random

import pytest

import t5kit
from t5kit.data.tokenizer import Tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

WORDS = ("the quick brown fox jumps over lazy dog . der schnelle braune Fuchs springt über den faulen Hund , "
         "le renard brun rapide saute par dessus chien paresseux ! el zorro marrón salta sobre perro perezoso").split()
PROBES = [
    "the quick fox", "  the   quick\n\nfox  ", "Fuchs springt\tüber den Hund.", "ζ fox 日本 ☃ emoji 🙂",
    "le renard <extra_id_0> saute", "Hund<extra_id_1>der", "<extra_id_0>. Hello the", "the </s> dog", "▁the x", "",
    "a<pad>b<unk>c", "UPPER lower MiXeD 12345",
]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(4000)]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(lines, vocab_size=70, out_dir=str(out))
    return out


def test_trained_tokenizer_layout(sp_dir):
    tok = Tokenizer.from_pretrained(sp_dir)
    assert len(tok) == 170 and tok.sentinel_id(0) == 169 and tok.sentinel_id(99) == 70
    assert tok.encode("the")[-1] == 1 and tok.encode("")[-1:] == [1]
    assert {"spiece.model", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in sp_dir.iterdir()}


@pytest.mark.hf
def test_legacy_ids_equal_transformers(sp_dir):
    """transformers 5.x tokenizes the legacy way everywhere; t5kit's legacy=True matches it."""
    ref = transformers.AutoTokenizer.from_pretrained(sp_dir)
    tok = Tokenizer.from_pretrained(sp_dir, legacy=True)
    for text in PROBES:
        assert tok.encode(text) == ref(text).input_ids, text
    assert tok.sentinel_id(0) == ref.convert_tokens_to_ids("<extra_id_0>")


@pytest.mark.hf
def test_seqio_ids_differ_only_after_special_tokens(sp_dir):
    """legacy=False (default): equal to transformers unless text follows a special token, where the
    dummy-prefix '▁' is not inserted (seqio; T5_REFERENCE 3.3: [32099, 5, 8774] not [32099, 3, 5, 8774])."""
    ref = transformers.AutoTokenizer.from_pretrained(sp_dir)
    tok = Tokenizer.from_pretrained(sp_dir)
    for text in PROBES:
        if "<" not in text:
            assert tok.encode(text) == ref(text).input_ids, text
    piece = tok.backend.sp.id_to_piece
    ids, legacy = tok.encode("<extra_id_0>. fox"), ref("<extra_id_0>. fox").input_ids
    assert ids[0] == legacy[0] == tok.sentinel_id(0)
    assert not piece(ids[1]).startswith("\u2581") and piece(legacy[1]).startswith("\u2581")  # legacy adds '▁'
    assert tok.encode("<extra_id_0> fox") == ref("<extra_id_0> fox").input_ids  # a real space is kept by both


@pytest.mark.hf
def test_tokenizer_json_loads_in_transformers_with_identical_ids(sp_dir, tmp_path):
    import shutil
    shutil.copy(sp_dir / "tokenizer.json", tmp_path)
    shutil.copy(sp_dir / "tokenizer_config.json", tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)  # no spiece.model: tokenizer.json only
    sp = Tokenizer.from_pretrained(sp_dir, legacy=True)
    tk = Tokenizer.from_pretrained(tmp_path, legacy=True)
    assert tk.kind == "tokenizers" and len(tk) == len(sp) == len(ref)
    for text in PROBES:
        assert ref(text).input_ids == sp.encode(text) == tk.encode(text), text


def test_decode_round_trip_and_batch(sp_dir):
    tok = Tokenizer.from_pretrained(sp_dir)
    assert tok.decode(tok.encode("the quick brown fox")) == "the quick brown fox"
    assert "<extra_id_0>" in tok.decode(tok.encode("the <extra_id_0> fox"), skip_special_tokens=False)
    ids, mask = tok.encode_batch(["the fox", "the quick brown fox jumps"], max_length=4)
    assert ids.shape == (2, 4) and mask[0].tolist() == [1, 1, 1, 0] and ids[1, -1].item() == 1
    with pytest.raises(ValueError, match="more than max_length=4"):
        tok.encode_batch(["the quick brown fox jumps"], max_length=4, truncation=False)


@pytest.mark.hf
def test_byt5_ids_equal_transformers():
    ref = transformers.ByT5Tokenizer()
    tok = Tokenizer.byt5()
    for text in ["hello", "  Grüße,\n日本 🙂", "", "a</s>b<pad>c"]:
        assert tok.encode(text) == ref(text).input_ids, text
    assert tok.decode(tok.encode("Grüße 🙂")) == "Grüße 🙂"
    assert tok.sentinel_id(0) == 258 and tok.sentinel_id(1) == 257  # span-corruption sentinels
    assert len(tok) == 384


def test_vocab_mismatch_is_an_error(sp_dir, tmp_path):
    import shutil
    for f in sp_dir.iterdir():
        shutil.copy(f, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 32128}))
    with pytest.raises(ValueError, match="vocab_size=32128 does not fit tokenizer .* 170 ids; expected 170..297"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 256}))  # padded up: fine
    assert len(Tokenizer.from_pretrained(tmp_path)) == 170


def test_no_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer found; expected spiece.model"):
        Tokenizer.from_pretrained(tmp_path)


def test_public_names():
    assert t5kit.Tokenizer is Tokenizer and t5kit.train_tokenizer is train_tokenizer


LITERALS = "the </s> fox <pad> dog <extra_id_0> x <unk><extra_id_1> ▁the"


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizers", "byt5"])
def test_literal_special_tokens_in_corpus_text_stay_text(sp_dir, tmp_path, kind):
    """Issue 18: with parse_special=False (pretraining documents) `</s>`, `<pad>`, `<extra_id_0>` are
    their characters, as seqio encodes them: the SentencePiece model's own ids for the whole string
    (the tokenizer.json twin gives the same), ByT5 bytes; the default (task text) reads them as ids."""
    import shutil

    import sentencepiece as spm

    if kind == "tokenizers":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(sp_dir / name, tmp_path)
    folder = tmp_path if kind == "tokenizers" else sp_dir
    tok = Tokenizer.byt5() if kind == "byt5" else Tokenizer.from_pretrained(folder)
    assert tok.kind == kind
    plain = tok.encode(LITERALS, add_eos=False, parse_special=False)
    if kind == "byt5":
        assert plain == [b + 3 for b in LITERALS.encode("utf-8")]
    else:
        assert plain == spm.SentencePieceProcessor(model_file=str(sp_dir / "spiece.model")).encode(LITERALS)
    assert tok.encode(LITERALS, parse_special=False) == plain + [tok.eos_id]
    control = {tok.pad_id, tok.eos_id} | ({tok.sentinel_id(0), tok.sentinel_id(1)} if kind != "byt5" else set())
    assert not control & set(plain)
    assert control <= set(tok.encode(LITERALS))  # task text: the special tokens' ids, as transformers gives them
    assert tok.encode("", parse_special=False) == [tok.eos_id]

"""Megatron-LM's tokenizer flags (issue 18): BERT WordPiece with Megatron's appended [BOS], [EOS] and
sentinels in T5's roles, ids equal to transformers' BertTokenizer (its `tokenizers` form and its
pure-Python legacy form), the export reloaded by t5kit, Megatron (vocab.txt) and transformers, and a
Megatron user's pretrain command run unchanged."""

import json

import numpy as np
import pytest

from t5kit.cli import main
from t5kit.data.store import TokenStore, build_token_store
from t5kit.data.tokenizer import Tokenizer

WORDS = ("the quick brown fox jumps over lazy dog The Quick Brown Fox der schnelle Fuchs über café naïve "
         "in beginning god created heaven and earth light darkness un").split()
PIECES = ["##s", "##es", "##ing", "##ed", "##aff", "##able", "##x"]
PUNCT = list(".,!?;:'\"()[]<>/_-") + [str(d) for d in range(10)]
# BERT's layout: [PAD] 0, [unusedN], [UNK] [CLS] [SEP] [MASK], then words (bert-large-cased-vocab.txt's order)
VOCAB = (["[PAD]"] + [f"[unused{i}]" for i in range(3)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
         + sorted(set(WORDS) | {w.lower() for w in WORDS}) + PIECES + PUNCT
         + ["s", "x", "e", "id", "extra", "pad", "EOS", "BOS", "cafe", "naive", "uber", "日", "本"])
TEXTS = ["the quick brown fox", "The Quick  Brown\tFox jumps!", "café naïve über", "日本 fox", "unaffable foxes",
         "fox\u0000es\u200b dog", "überlongwordxyz", "God created (heaven) & earth.", "x" * 100, ""]
LITERALS = "the </s> fox <pad> dog <extra_id_0> [EOS] [CLS] <unk> [PAD] <extra_id_4>"


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return path


TYPES = [("BertWordPieceCase", False), ("BertWordPieceLowerCase", True)]


@pytest.mark.hf
@pytest.mark.parametrize("kind,lower", TYPES)
def test_ids_equal_transformers_bert_tokenizer(vocab, kind, lower):
    import transformers
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    tok = Tokenizer.from_megatron(kind, vocab_file=str(vocab), vocab_extra_ids=5)
    refs = [transformers.BertTokenizer(str(vocab), do_lower_case=lower),  # `tokenizers`, as t5kit
            BertTokenizerLegacy(str(vocab), do_lower_case=lower)]  # pure Python, Google's BERT code as Megatron's
    for ref in refs:
        for text in TEXTS:
            want = ref(text, add_special_tokens=False).input_ids
            assert tok.encode(text, add_eos=False, parse_special=False) == want, (type(ref).__name__, text)
            assert tok.encode(text) == want + [tok.eos_id]  # T5: `</s>` ([EOS]) appended, no BOS
        # task text parses the special tokens transformers knows, as transformers does
        task = "fox [CLS] dog[SEP]"
        assert tok.encode(task, add_eos=False) == ref(task, add_special_tokens=False).input_ids
    cased = tok.encode("The Fox", add_eos=False) != tok.encode("the fox", add_eos=False)
    assert cased != lower


def test_megatron_layout_in_t5_roles(vocab):
    """Megatron's `_BertWordPieceTokenizer`: [BOS] then [EOS] appended after the vocabulary, then the
    sentinels; here <extra_id_0> is the top id, counting down (T5's order)."""
    n = len(VOCAB)
    tok = Tokenizer.from_megatron("BertWordPieceCase", vocab_file=str(vocab), vocab_extra_ids=100)
    assert len(tok) == n + 2 + 100 and tok.kind == "wordpiece"
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, n + 1, VOCAB.index("[UNK]"))
    assert tok.id_to_token(n) == "[BOS]" and tok.id_to_token(n + 1) == "[EOS]"
    assert [tok.sentinel_id(i) for i in (0, 1, 99)] == [n + 101, n + 100, n + 2]
    assert [tok.id_to_token(tok.sentinel_id(i)) for i in (0, 99)] == ["<extra_id_0>", "<extra_id_99>"]
    assert tok.encode("fox <extra_id_0> dog [EOS]") == [VOCAB.index("fox"), n + 101, VOCAB.index("dog"), n + 1, n + 1]
    assert tok.decode(tok.encode("the fox <extra_id_0> jumps")) == "the fox jumps"
    assert tok.decode(tok.encode("the fox <extra_id_0>"), skip_special_tokens=False) == "the fox <extra_id_0> [EOS]"
    assert all(tok.is_special(i) for i in (0, n, n + 1, n + 2, n + 101)) and not tok.is_special(1)  # [unused0]
    # Megatron's WordPiece gives up on words over 200 characters (transformers: 100)
    assert tok.encode("x" * 150, add_eos=False) == [VOCAB.index("x")] + [VOCAB.index("##x")] * 149
    assert tok.encode("x" * 201, add_eos=False) == [tok.unk_id]
    tok.check_model_vocab(-(-len(tok) // 128) * 128)


def test_vocab_with_its_own_eos_keeps_it(tmp_path):
    """Megatron's `add_token` appends [BOS] / [EOS] only when the vocabulary lacks them."""
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB + ["[EOS]"]) + "\n")
    tok = Tokenizer.from_megatron("BertWordPieceCase", vocab_file=str(path), vocab_extra_ids=3)
    assert tok.eos_id == len(VOCAB) and tok.id_to_token(len(VOCAB) + 1) == "[BOS]" and len(tok) == len(VOCAB) + 2 + 3


def test_text_stays_text_in_corpus_and_store(vocab, tmp_path):
    tok = Tokenizer.from_megatron("BertWordPieceLowerCase", vocab_file=str(vocab), vocab_extra_ids=5)
    control = {tok.eos_id, tok.pad_id, *(tok.sentinel_id(i) for i in range(5)), *tok.specials.values()}
    plain = tok.encode(LITERALS, add_eos=False, parse_special=False)
    assert not control & set(plain) - {tok.unk_id}
    assert {tok.eos_id, tok.sentinel_id(0), tok.sentinel_id(4), tok.pad_id} <= set(tok.encode(LITERALS))  # task text
    corpus = tmp_path / "c.txt"
    corpus.write_text(f"{LITERALS}\nthe fox\n")
    build_token_store([str(corpus)], tok, str(tmp_path / "s"), progress=False)
    store = TokenStore(str(tmp_path / "s"), tok)
    assert np.asarray(store.tokens).tolist() == plain + tok.encode("the fox", add_eos=False)


@pytest.mark.hf
def test_export_reloads_in_t5kit_megatron_and_transformers(vocab, tmp_path):
    import transformers

    tok = Tokenizer.from_megatron("BertWordPieceLowerCase", vocab_file=str(vocab), vocab_extra_ids=7)
    tok.save_pretrained(str(tmp_path))
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.kind == "wordpiece" and again.fingerprint() == tok.fingerprint() and len(again) == len(tok)
    assert (tmp_path / "vocab.txt").read_text().splitlines() == VOCAB  # Megatron's --vocab-file, unchanged
    megatron = Tokenizer.from_megatron(None, vocab_file=str(tmp_path / "vocab.txt"), vocab_extra_ids=7)
    assert megatron.fingerprint() == tok.fingerprint()  # --vocab-file alone: BertWordPieceLowerCase (pretrain_t5.py)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(ref) == len(tok)
    for text in [*TEXTS, "the fox <extra_id_0> jumps [EOS]", "Über <extra_id_6>"]:
        assert ref(text).input_ids == tok.encode(text) == again.encode(text), text
    assert ref.convert_tokens_to_ids("<extra_id_0>") == tok.sentinel_id(0)
    assert tok.fingerprint() != Tokenizer.from_megatron("BertWordPieceCase", vocab_file=str(vocab),
                                                       vocab_extra_ids=7).fingerprint()


@pytest.mark.parametrize("args,message", [
    (["--tokenizer-type", "BertWordPieceCase"], "--tokenizer-type BertWordPieceCase needs --vocab-file"),
    (["--tokenizer-type", "SentencePieceTokenizer"], "--tokenizer-type SentencePieceTokenizer needs --tokenizer-model"),
    (["--tokenizer-type", "HuggingFaceTokenizer"], "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model"),
    (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "v"],
     "--tokenizer-type 'GPT2BPETokenizer': expected one of SentencePieceTokenizer, HuggingFaceTokenizer"),
    (["--tokenizer-model", "m.model"], "--tokenizer-model m.model needs --tokenizer-type SentencePieceTokenizer"),
    (["--tokenizer-type", "BertWordPieceCase", "--vocab-file", "{tmp}/nope.txt"],
     "--vocab-file {tmp}/nope.txt: no such file"),
    (["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "{tmp}/nope.model"],
     "--tokenizer-model {tmp}/nope.model: no such file"),
    (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "{tmp}/nope"],
     "--tokenizer-model {tmp}/nope: directory not found"),
    (["--vocab-file", "{tmp}/dup.txt"], "--vocab-file {tmp}/dup.txt: line 5 repeats 'fox' from line 4"),
    (["--vocab-file", "{tmp}/nopad.txt"], "--vocab-file {tmp}/nopad.txt: [PAD] has id 1, expected 0"),
    (["--vocab-file", "{tmp}/v.txt", "--vocab-extra-ids", "0"], "--vocab-extra-ids 0: span corruption needs sentinels"),
    (["--vocab-file", "{tmp}/v.txt", "--tokenizer", "{tmp}"], "give --tokenizer DIR, or Megatron's --tokenizer-type"),
])
def test_bad_tokenizer_flags_name_the_flag(tmp_path, capsys, args, message):
    (tmp_path / "dup.txt").write_text("[PAD]\n[UNK]\nthe\nfox\nfox\n")
    (tmp_path / "nopad.txt").write_text("[UNK]\n[PAD]\nfox\n")
    (tmp_path / "v.txt").write_text("\n".join(VOCAB) + "\n")
    (tmp_path / "c.txt").write_text("the fox\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(["preprocess", "--input", str(tmp_path / "c.txt"), "--out", str(tmp_path / "s"), *args]) == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err


def test_pretrain_names_a_bad_vocab_file_before_reading_the_corpus(tmp_path, capsys):
    """The tokenizer flags are checked first: a corpus with a bad line is not what gets reported."""
    (tmp_path / "c.txt").write_bytes(b"the fox\n\xff bad line\n")
    assert main(["pretrain", "--data-path", str(tmp_path / "c.txt"), "--save", str(tmp_path / "run"),
                 "--vocab-file", str(tmp_path / "nope.txt"), "--train-iters", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--vocab-file {tmp_path / 'nope.txt'}: no such file" in err and "UTF-8" not in err


def test_sentencepiece_and_huggingface_types_are_t5_tokenizers(tmp_path):
    """SentencePieceTokenizer: the model file with T5's layout; HuggingFaceTokenizer: a tokenizer
    directory. Both give the tokenizer t5kit reads from that directory, in `t5kit preprocess` too."""
    from t5kit.data.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    train_tokenizer([" ".join(rng.choice(WORDS, 12)) for _ in range(500)], 40, str(tmp_path / "tok"))
    ref = Tokenizer.from_pretrained(tmp_path / "tok")
    sp = Tokenizer.from_megatron("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "tok" / "spiece.model"))
    hf = Tokenizer.from_megatron("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tok"))
    assert sp.fingerprint() == hf.fingerprint() == ref.fingerprint() and sp.sentinel_id(0) == len(ref) - 1 == 139
    assert sp.encode("the fox <extra_id_0> dog") == ref.encode("the fox <extra_id_0> dog")
    (tmp_path / "c.txt").write_text("the quick fox\nlazy dog\n")
    assert main(["preprocess", "--input", str(tmp_path / "c.txt"), "--out", str(tmp_path / "s"), "--tokenizer-type",
                 "SentencePieceTokenizer", "--tokenizer-model", str(tmp_path / "tok" / "spiece.model")]) == 0
    store = TokenStore(str(tmp_path / "s"), ref)  # checks the fingerprint
    assert np.asarray(store.tokens).tolist() == ref.encode("the quick fox", False) + ref.encode("lazy dog", False)


def test_megatron_pretrain_command_runs_unchanged(vocab, tmp_path):
    """Megatron's examples/t5/train_t5_220m_distributed.sh flags (shrunk), WordPiece tokenizer: the
    export holds the tokenizer, and its config stops generation on [EOS]."""
    rng = np.random.default_rng(0)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS, 30)) + " [EOS] <extra_id_0> ." for _ in range(60)) + "\n")
    out = tmp_path / "run"
    assert main(["pretrain", "--encoder-num-layers", "2", "--decoder-num-layers", "2", "--hidden-size", "32",
                 "--num-attention-heads", "2", "--kv-channels", "16", "--ffn-hidden-size", "64",
                 "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "4",
                 "--global-batch-size", "4", "--lr", "0.0001", "--train-iters", "2", "--lr-warmup-iters", "1",
                 "--data-path", str(corpus), "--tokenizer-type", "BertWordPieceCase", "--vocab-file", str(vocab),
                 "--vocab-extra-ids", "100", "--save", str(out), "--eval-interval", "0", "--log-interval", "1"]) == 0
    tok = Tokenizer.from_megatron("BertWordPieceCase", vocab_file=str(vocab), vocab_extra_ids=100)
    final = Tokenizer.from_pretrained(out / "final")  # also checks config.json's vocab_size against it
    assert final.fingerprint() == tok.fingerprint()
    cfg = json.load(open(out / "final" / "config.json"))
    assert (cfg["eos_token_id"], cfg["pad_token_id"], cfg["decoder_start_token_id"]) == (tok.eos_id, 0, 0)
    assert cfg["vocab_size"] == 128 * -(-len(tok) // 128)
    tokens = np.asarray(TokenStore(str(out / "data"), tok).tokens)
    assert tok.eos_id not in tokens and tokens.max() < len(VOCAB)  # "[EOS]", "<extra_id_0>" in the corpus stayed text

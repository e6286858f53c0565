"""The vocabulary backends a `Tokenizer` (tokenizer.py) wraps, one per vocabulary file:
SentencePiece (spiece.model), `tokenizers` (tokenizer.json), ByT5's bytes, and Megatron-LM's BERT
WordPiece (vocab.txt). Each reads and checks its file (T5's pad 0, eos 1, unk 2; WordPiece's own
roles) and turns text into ids and ids into text (`size`, `encode`, `encode_text`, `decode`).

Separate from tokenizer.py because each file format's quirks are one concept and the T5 tokenizer
over them another: T5's special tokens, sentinels, added tokens, batching and saving live in
`Tokenizer`, which picks a backend here; this module imports nothing of tokenizer.py.
"""

from __future__ import annotations

import json

PAD, EOS, UNK = 0, 1, 2
BYTE_OFFSET = 3  # ByT5: byte b -> id b + 3


class SentencePieceVocab:
    def __init__(self, path: str, extra_ids: int):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        try:
            with open(path, "rb") as f:
                self.model_bytes = f.read()
            self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
            self.proto = pb.ModelProto.FromString(self.model_bytes)
        except Exception as e:
            raise ValueError(f"{path}: not a valid SentencePiece model ({e})") from None
        for piece, want in (("<pad>", PAD), ("</s>", EOS), ("<unk>", UNK)):
            if self.sp.piece_to_id(piece) != want:
                raise ValueError(f"{path}: {piece} has id {self.sp.piece_to_id(piece)}, expected {want} (T5 ids)")
        no_prefix = pb.ModelProto.FromString(self.model_bytes)
        no_prefix.normalizer_spec.add_dummy_prefix = False  # for text right after a special token
        self.sp_no_prefix = spm.SentencePieceProcessor(model_proto=no_prefix.SerializeToString())
        self.base = self.sp.get_piece_size()
        self.size = self.base + extra_ids

    def encode(self, chunk: str, after_special: bool) -> list[int]:
        if after_special and not chunk[:1].isspace():
            return self.sp_no_prefix.encode(chunk)
        return self.sp.encode(chunk)

    def encode_text(self, text: str) -> list[int]:
        return self.sp.encode(text)  # SentencePiece never matches its control pieces (<pad>, </s>) in text

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class TokenizersVocab:
    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tk = HFTokenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        self.text_tk = _text_only(self.tk)
        self.size = self.tk.get_vocab_size(with_added_tokens=True)
        for piece, want in (("<pad>", PAD), ("</s>", EOS), ("<unk>", UNK)):
            if self.tk.token_to_id(piece) != want:
                raise ValueError(f"{path}: {piece} has id {self.tk.token_to_id(piece)}, expected {want} (T5 ids)")

    def encode(self, chunk: str, after_special: bool) -> list[int]:
        return self.tk.encode(chunk, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        return self.text_tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)


def _text_only(tk):
    """A copy of the `tokenizers` pipeline `tk` that encodes the special tokens' text as text: not
    split out of the text first (`encode_special_tokens`), and not matched by the model either, whose
    vocabulary lists them as ordinary pieces in T5's tokenizer.json (`</s>` would still come out as
    id 1). There they are renamed with a leading space, which no pre-tokenized word contains."""
    from tokenizers import Tokenizer as HFTokenizer

    spec = json.loads(tk.to_str())
    specials = {t["content"] for t in spec["added_tokens"] if t["special"]}
    model = spec["model"]
    if model["type"] == "Unigram":
        model["vocab"] = [[" " + p if p in specials else p, score] for p, score in model["vocab"]]
    elif isinstance(model.get("vocab"), dict):  # WordPiece, BPE, WordLevel: their unk is found by name
        renamed = specials - {model.get("unk_token")}
        model["vocab"] = {(" " + p if p in renamed else p): i for p, i in model["vocab"].items()}
    text_tk = HFTokenizer.from_str(json.dumps(spec))
    text_tk.encode_special_tokens = True
    return text_tk


class ByteVocab:
    size = 256 + BYTE_OFFSET

    def encode(self, chunk: str, after_special: bool) -> list[int]:
        return self.encode_text(chunk)

    def encode_text(self, text: str) -> list[int]:
        return [b + BYTE_OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < 256 + BYTE_OFFSET).decode("utf-8", errors="ignore")


class WordPieceVocab:
    """Megatron-LM's BertWordPieceCase / BertWordPieceLowerCase (`_BertWordPieceTokenizer`,
    megatron/training/tokenizer/tokenizer.py until NVIDIA/Megatron-LM#2946, over its copy of Google's
    bert_tokenization.py), built on `tokenizers`:
    - vocab.txt: one token a line, stripped, id = line number;
    - text: control characters dropped, CJK characters split, lowercased and accents stripped for
      the LowerCase type, split on whitespace and punctuation; then greedy longest-match WordPiece with
      `##` continuations, a word over 200 characters becoming [UNK] (Megatron's limit; transformers' is 100);
    - Megatron appends [BOS] and [EOS] (unless the vocabulary has them), then `vocab_extra_ids` sentinels.
    T5's roles: pad [PAD] (0 in BERT vocabularies, also T5's decoder start), EOS [EOS], unk [UNK].

    One departure, by design: Megatron names its first appended sentinel <extra_id_0> and gives it to
    the first noise span (`T5MaskedWordPieceDataset`). Here the same ids are named in T5's order, the
    top id <extra_id_0> counting down (`sentinel_id`), as in every T5 vocabulary. Text ids, [BOS] and
    [EOS] are Megatron's, so its .bin files (text and [EOS] only, no sentinels) read unchanged."""

    def __init__(self, vocab_file: str, lower_case: bool, extra_ids: int, where: str):
        """`where` names the file in errors: '--vocab-file PATH', or the vocab.txt of an exported folder."""
        from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import WordPiece

        self.tokens, self.lower_case = _read_vocab_txt(vocab_file, where), lower_case
        vocab = {t: i for i, t in enumerate(self.tokens)}
        if vocab.get("[PAD]") != PAD:
            raise ValueError(f"{where}: [PAD] has id {vocab.get('[PAD]')}, expected 0 (T5 pads and starts the "
                             "decoder with id 0)")
        if "[UNK]" not in vocab:
            raise ValueError(f"{where}: no [UNK] token; WordPiece needs one for words it cannot split")
        for t in ("[BOS]", "[EOS]"):  # Megatron's `add_token`: appended unless present
            vocab.setdefault(t, len(vocab))
        sentinels = [f"<extra_id_{i}>" for i in reversed(range(extra_ids))]
        for t in sentinels:
            if t in vocab:
                raise ValueError(f"{where}: line {vocab[t] + 1} is {t}; the sentinels are appended by "
                                 "--vocab-extra-ids, not listed in the vocabulary")
            vocab[t] = len(vocab)
        self.size = len(vocab)
        self.pad, self.eos, self.unk = PAD, vocab["[EOS]"], vocab["[UNK]"]
        self.specials = {t: vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]",
                                               *sentinels) if t in vocab}
        self.special_ids = frozenset(self.specials.values())
        tk = HFTokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##",
                                   max_input_chars_per_word=200))
        tk.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                   strip_accents=lower_case, lowercase=lower_case)
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tk.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in self.specials])
        tk.post_processor = processors.TemplateProcessing(  # T5: `A [EOS]`, pairs `A [EOS] B [EOS]`, no BOS
            single=["$A", "[EOS]"], pair=["$A", "[EOS]", "$B", "[EOS]"], special_tokens=[("[EOS]", self.eos)])
        self.tk = tk  # as saved in tokenizer.json: transformers parses the special tokens' text
        self.text_tk = _text_only(tk)  # t5kit parses them itself, or not at all (Tokenizer.encode)

    def encode(self, chunk: str, after_special: bool) -> list[int]:
        return self.encode_text(chunk)

    def encode_text(self, text: str) -> list[int]:
        return self.text_tk.encode(text, add_special_tokens=False).ids


def _read_vocab_txt(path: str, where: str) -> list[str]:
    """BERT's vocab.txt as Megatron's `load_vocab` reads it: one token a line, stripped, id = line
    number. A repeated token is an error: Megatron would then append [BOS] on an id already taken."""
    try:
        with open(path, encoding="utf-8") as f:
            tokens = [line.strip() for line in f]
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"{where}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte {e.start})") from None
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in seen:
            raise ValueError(f"{where}: line {i + 1} repeats {t!r} from line {seen[t] + 1}")
        seen[t] = i
    return tokens

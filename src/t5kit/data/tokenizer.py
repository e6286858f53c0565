"""T5 tokenizers: SentencePiece (spiece.model), `tokenizers` (tokenizer.json) and ByT5 bytes.

T5 ids everywhere: pad 0, eos 1, unk 2, no BOS, `</s>` appended; `<extra_id_i>` is
`vocab_size - 1 - i` (seqio `sentinel_id`; transformers `_convert_token_to_id`). ByT5: byte b is
b + 3, and span-corruption sentinels count down from 258 (T5_REFERENCE 3.3).

`legacy` (transformers PR #24565): with legacy=False (default, seqio's behaviour) text right after
a special token gets no dummy-prefix `▁`, so "<extra_id_0>. Hello" -> [32099, 5, 8774].
transformers 5.x always tokenizes the legacy way ([32099, 3, 5, 8774]); legacy=True reproduces it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence

from ..atomic import atomic_path, write_json
from ..model.hub import resolve_dir

PAD, EOS, UNK = 0, 1, 2
SPECIAL_TEXT = {"<pad>": PAD, "</s>": EOS, "<unk>": UNK}
SPIECE, TOKENIZER_JSON = "spiece.model", "tokenizer.json"
BYTE_OFFSET = 3  # ByT5: byte b -> id b + 3


class _SentencePiece:
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

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


class _Tokenizers:
    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tk = HFTokenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        self.size = self.tk.get_vocab_size(with_added_tokens=True)
        for piece, want in (("<pad>", PAD), ("</s>", EOS), ("<unk>", UNK)):
            if self.tk.token_to_id(piece) != want:
                raise ValueError(f"{path}: {piece} has id {self.tk.token_to_id(piece)}, expected {want} (T5 ids)")

    def encode(self, chunk: str, after_special: bool) -> list[int]:
        return self.tk.encode(chunk, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)


class _Bytes:
    size = 256 + BYTE_OFFSET

    def encode(self, chunk: str, after_special: bool) -> list[int]:
        return [b + BYTE_OFFSET for b in chunk.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < 256 + BYTE_OFFSET).decode("utf-8", errors="ignore")


class Tokenizer:
    """One T5 tokenizer over any backend. Encoding returns ids ending in EOS."""

    def __init__(self, backend, kind: str, extra_ids: int = 100, legacy: bool = False, source: str = ""):
        self.backend, self.kind, self.extra_ids, self.legacy, self.source = backend, kind, extra_ids, legacy, source
        self.vocab_size = backend.size if kind != "byt5" else backend.size + 125  # HF ByT5: 125 extra ids
        names = list(SPECIAL_TEXT) + ([f"<extra_id_{i}>" for i in range(extra_ids)] if kind == "sentencepiece" else [])
        self._special = re.compile("(" + "|".join(map(re.escape, names)) + ")")
        self.pad_id, self.eos_id, self.unk_id = PAD, EOS, UNK

    # ---- construction ----

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, legacy: bool = False) -> "Tokenizer":
        """spiece.model (preferred), else tokenizer.json, else ByT5 bytes when the folder's config says
        ByT5 (tokenizer_class ByT5Tokenizer, or vocab_size 384 with no vocabulary file). If a model
        config.json sits beside it, its vocab_size must fit this tokenizer (`check_model_vocab`)."""
        folder = resolve_dir(path_or_hub_id, allow_patterns=["*.json", "*.model"])
        tcfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
        mcfg = _read_json(os.path.join(folder, "config.json"))
        extra_ids = int(tcfg.get("extra_ids", 100))
        if os.path.isfile(os.path.join(folder, SPIECE)):
            tok = cls(_SentencePiece(os.path.join(folder, SPIECE), extra_ids), "sentencepiece", extra_ids, legacy, folder)
        elif os.path.isfile(os.path.join(folder, TOKENIZER_JSON)):
            tok = cls(_Tokenizers(os.path.join(folder, TOKENIZER_JSON)), "tokenizers", extra_ids, legacy, folder)
        elif tcfg.get("tokenizer_class") == "ByT5Tokenizer" or mcfg.get("vocab_size") == 384:
            tok = cls.byt5()
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer found; expected {SPIECE}, {TOKENIZER_JSON}, or a "
                                    "ByT5 config (tokenizer_class ByT5Tokenizer or vocab_size 384)")
        if "vocab_size" in mcfg:
            tok.check_model_vocab(int(mcfg["vocab_size"]), os.path.join(folder, "config.json"))
        return tok

    @classmethod
    def byt5(cls) -> "Tokenizer":
        return cls(_Bytes(), "byt5", extra_ids=0, source="byt5")

    def check_model_vocab(self, model_vocab: int, source: str = "model config") -> None:
        """T5 pads the embedding up to a multiple of 128 (32100 -> 32128; ByT5 259 + 125 -> 384)."""
        if not self.vocab_size <= model_vocab < self.vocab_size + 128:
            raise ValueError(f"{source}: vocab_size={model_vocab} does not fit tokenizer {self.source!r} with "
                             f"{self.vocab_size} ids; expected {self.vocab_size}..{self.vocab_size + 127}")

    def __len__(self) -> int:
        return self.vocab_size

    def fingerprint(self) -> str:
        """Identity of the id mapping, recorded in token stores: kind, size, hash of the vocabulary."""
        import hashlib
        if self.kind == "sentencepiece":
            blob = self.backend.model_bytes
        elif self.kind == "tokenizers":
            blob = self.backend.tk.to_str().encode()
        else:
            blob = b"byt5"
        return f"{self.kind}:{self.vocab_size}:{hashlib.sha256(blob).hexdigest()[:16]}"

    # ---- ids ----

    def sentinel_id(self, i: int) -> int:
        """`<extra_id_i>`: counts down from the top (seqio); ByT5 from 258 (byte 0xFF + 3)."""
        top = 255 + BYTE_OFFSET if self.kind == "byt5" else self.vocab_size - 1
        return top - i

    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if self.kind == "sentencepiece":
            text = text.replace("\u2581", " ")  # a literal '▁' is a space, as in transformers
        ids: list[int] = []
        after_special = False
        for j, part in enumerate(self._special.split(text)):
            if j % 2:  # a special token's text
                ids.append(self._special_id(part))
                after_special = True
            elif part:
                ids.extend(self.backend.encode(part, after_special and not self.legacy))
                after_special = False
        return ids + [EOS] if add_eos else ids

    def _special_id(self, text: str) -> int:
        if text in SPECIAL_TEXT:
            return SPECIAL_TEXT[text]
        return self.sentinel_id(int(text[len("<extra_id_"):-1]))

    def is_special(self, i: int) -> bool:
        return i < BYTE_OFFSET or (self.kind == "sentencepiece" and i >= self.backend.base)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        out, run = [], []
        for i in (int(x) for x in ids):
            if not self.is_special(i):
                run.append(i)
                continue
            if run:
                out.append(self.backend.decode(run))
                run = []
            if not skip_special_tokens:
                out.append(self.id_to_token(i))
        if run:
            out.append(self.backend.decode(run))
        return "".join(out) if skip_special_tokens else " ".join(o for o in out if o)

    def id_to_token(self, i: int) -> str:
        if i < BYTE_OFFSET:
            return ("<pad>", "</s>", "<unk>")[i]
        if self.kind == "sentencepiece" and i >= self.backend.base:
            return f"<extra_id_{self.vocab_size - 1 - i}>"
        if self.kind == "byt5":
            return chr(i - BYTE_OFFSET) if i < 256 + BYTE_OFFSET else f"<extra_id_{i - 256 - BYTE_OFFSET}>"
        return self.backend.tk.id_to_token(i) if self.kind == "tokenizers" else self.backend.sp.id_to_piece(i)

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None, truncation: bool = True,
                     return_tensors: bool = True):
        """-> (input_ids, attention_mask), right-padded with pad 0: (B, N) tensors, or lists.
        Truncation keeps the first max_length - 1 tokens and the EOS (`truncate`)."""
        rows = [self.encode(t) for t in texts]
        if max_length is not None:
            too_long = [i for i, r in enumerate(rows) if len(r) > max_length]
            if too_long and not truncation:
                raise ValueError(f"text {too_long[0]} has {len(rows[too_long[0]])} tokens, more than max_length={max_length}")
            rows = [truncate_ids(r, max_length) for r in rows]
        if return_tensors:
            return pad_rows(rows)
        n = max((len(r) for r in rows), default=0)
        return [r + [PAD] * (n - len(r)) for r in rows], [[1] * len(r) + [0] * (n - len(r)) for r in rows]

    def decode_batch(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in (rows.tolist() if hasattr(rows, "tolist") else rows)]

    def save_pretrained(self, out_dir: str) -> None:
        """Copy the vocabulary files and a tokenizer_config.json into out_dir (atomically)."""
        os.makedirs(out_dir, exist_ok=True)
        if self.kind == "sentencepiece":
            with atomic_path(os.path.join(out_dir, SPIECE)) as tmp, open(tmp, "wb") as f:
                f.write(self.backend.model_bytes)
            write_json(os.path.join(out_dir, TOKENIZER_JSON), _tokenizer_json(self.backend, self.extra_ids))
        elif self.kind == "tokenizers":
            self.backend.tk.save(os.path.join(out_dir, TOKENIZER_JSON))
        write_json(os.path.join(out_dir, "tokenizer_config.json"), _tokenizer_config(self))


def truncate_ids(ids: list[int], max_length: int, eos: int = EOS) -> list[int]:
    """The first max_length - 1 ids and the EOS when `ids` is longer than max_length (as transformers
    truncates with add_special_tokens: the EOS is kept); `ids` itself otherwise.

    >>> truncate_ids([5, 6, 7, 1], 3), truncate_ids([5, 1], 3)
    ([5, 6, 1], [5, 1])
    """
    return ids if len(ids) <= max_length else ids[:max_length - 1] + [eos]


def pad_rows(rows: Sequence[Sequence[int]], pad: int = PAD, device=None):
    """Rows of ids -> (ids (B, S), attention_mask (B, S)) int64 tensors, right-padded with `pad` to the
    longest row; mask 1 = token, 0 = padding."""
    import torch
    width = max((len(r) for r in rows), default=0)
    ids = torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    lengths = torch.tensor([len(r) for r in rows], device=device)
    return ids.reshape(len(rows), width), (torch.arange(width, device=device)[None] < lengths[:, None]).long()


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _tokenizer_config(tok: Tokenizer) -> dict:
    if tok.kind == "byt5":
        return {"tokenizer_class": "ByT5Tokenizer", "extra_ids": 125}
    return {"tokenizer_class": "T5Tokenizer", "extra_ids": tok.extra_ids, "legacy": tok.legacy,
            "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
            "additional_special_tokens": [f"<extra_id_{i}>" for i in range(tok.extra_ids)]}


def _tokenizer_json(sp: _SentencePiece, extra_ids: int) -> dict:
    """The `tokenizers` pipeline that transformers builds for T5 from a SentencePiece model
    (transformers 5.x `T5Tokenizer`): Unigram over the pieces, the model's precompiled
    normalizer, whitespace split + Metaspace, `</s>` appended, sentinels as added tokens."""
    from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import Unigram

    vocab = [(p.piece, p.score) for p in sp.proto.pieces] + [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids))]
    tk = HFTokenizer(Unigram(vocab, unk_id=UNK, byte_fallback=False))
    charsmap = sp.proto.normalizer_spec.precompiled_charsmap
    if charsmap:
        tk.normalizer = normalizers.Precompiled(charsmap)
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)])
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in
                           ["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in reversed(range(extra_ids))]])
    tk.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                      special_tokens=[("</s>", EOS)])
    return json.loads(tk.to_str())


def train_tokenizer(texts_or_files: Iterable[str], vocab_size: int, out_dir: str, extra_ids: int = 100,
                    character_coverage: float = 0.9995, max_sentences: int = 2_000_000) -> Tokenizer:
    """Train a SentencePiece unigram model with T5 ids (pad 0, eos 1, unk 2, no BOS) and nmt_nfkc
    normalization, plus `extra_ids` sentinels at the top. `vocab_size` counts SentencePiece pieces
    (T5: 32000, so 32100 ids with sentinels). Writes spiece.model, tokenizer.json (loadable by
    `transformers.AutoTokenizer`) and tokenizer_config.json into out_dir."""
    import sentencepiece as spm

    items = [texts_or_files] if isinstance(texts_or_files, str) else texts_or_files
    if isinstance(items, (list, tuple)) and items and all(os.path.isfile(p) for p in items):  # one sentence a line
        texts = (line for p in items for line in open(p, encoding="utf-8"))
    else:  # texts, possibly a lazy iterator over a corpus
        texts = iter(items)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, SPIECE)
    with atomic_path(path) as tmp:
        prefix = tmp[:-len(".tmp")]
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=(t for t in texts if t.strip()), model_prefix=prefix, vocab_size=vocab_size,
                model_type="unigram", pad_id=PAD, eos_id=EOS, unk_id=UNK, bos_id=-1,
                character_coverage=character_coverage, normalization_rule_name="nmt_nfkc",
                input_sentence_size=max_sentences, shuffle_input_sentence=True, minloglevel=2)
        except RuntimeError as e:
            raise ValueError(f"tokenizer training failed for vocab_size={vocab_size} ({e}); give more text or a "
                             "smaller vocabulary size") from None
        os.replace(prefix + ".model", tmp)
        if os.path.exists(prefix + ".vocab"):
            os.remove(prefix + ".vocab")
    tok = Tokenizer(_SentencePiece(path, extra_ids), "sentencepiece", extra_ids, source=out_dir)
    tok.save_pretrained(out_dir)
    return tok

"""T5 tokenizers: SentencePiece (spiece.model), `tokenizers` (tokenizer.json), ByT5 bytes, and
Megatron-LM's BERT WordPiece (vocab.txt) with T5's roles. The backend that reads each vocabulary
file is in vocabularies.py; `Tokenizer` puts T5's special tokens and sentinels over it.

T5 ids everywhere: pad 0, eos 1, unk 2, no BOS, `</s>` appended; `<extra_id_i>` is
`vocab_size - 1 - i` (seqio `sentinel_id`; transformers `_convert_token_to_id`). ByT5: byte b is
b + 3, and span-corruption sentinels count down from 258 (T5_REFERENCE 3.3). WordPiece: pad [PAD]
(0), EOS [EOS], unk [UNK], sentinels counting down from the top (`WordPieceVocab`).

Special tokens' text: `encode(text)` reads `</s>`, `<extra_id_0>`, ... as their ids, as transformers
does; `encode(text, parse_special=False)` keeps every character text, as seqio does (issue 18).

`legacy` (transformers PR #24565): with legacy=False (default, seqio's behaviour) text right after
a special token gets no dummy-prefix `▁`, so "<extra_id_0>. Hello" -> [32099, 5, 8774].
transformers 5.x always tokenizes the legacy way ([32099, 3, 5, 8774]); legacy=True reproduces it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence

from ..atomic import atomic_path, write_json, write_text
from ..model.hub import resolve_dir
from .vocabularies import BYTE_OFFSET, EOS, PAD, UNK, ByteVocab, SentencePieceVocab, TokenizersVocab, WordPieceVocab

SPECIAL_TEXT = {"<pad>": PAD, "</s>": EOS, "<unk>": UNK}
SPIECE, TOKENIZER_JSON, VOCAB_TXT = "spiece.model", "tokenizer.json", "vocab.txt"
WORDPIECE_TYPES = {"BertWordPieceCase": False, "BertWordPieceLowerCase": True}  # Megatron type -> lower_case
MEGATRON_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", *WORDPIECE_TYPES)


class Tokenizer:
    """One T5 tokenizer over any backend. Encoding returns ids ending in EOS."""

    def __init__(self, backend, kind: str, extra_ids: int = 100, legacy: bool = False, source: str = ""):
        self.backend, self.kind, self.extra_ids, self.legacy, self.source = backend, kind, extra_ids, legacy, source
        self.vocab_size = backend.size if kind != "byt5" else backend.size + 125  # HF ByT5: 125 extra ids
        if kind == "wordpiece":
            self.specials = dict(backend.specials)  # text -> id of the tokens `encode` parses
            self.pad_id, self.eos_id, self.unk_id = backend.pad, backend.eos, backend.unk
        else:
            sentinels = range(extra_ids) if kind == "sentencepiece" else ()
            self.specials = {**SPECIAL_TEXT, **{f"<extra_id_{i}>": self.vocab_size - 1 - i for i in sentinels}}
            self.pad_id, self.eos_id, self.unk_id = PAD, EOS, UNK
        self.added: list[str] = []  # special tokens appended after every id (`add_special_tokens`)
        self._special = self._specials_pattern()

    def _specials_pattern(self) -> re.Pattern:
        return re.compile("(" + "|".join(map(re.escape, self.specials)) + ")")

    # ---- construction ----

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, legacy: bool = False) -> "Tokenizer":
        """spiece.model (preferred), else Megatron's WordPiece when tokenizer_config.json names its type
        (vocab.txt, as `save_pretrained` writes it), else tokenizer.json, else ByT5 bytes when the
        folder's config says ByT5 (tokenizer_class ByT5Tokenizer, or vocab_size 384 with no vocabulary
        file). If a model config.json sits beside it, its vocab_size must fit this tokenizer
        (`check_model_vocab`)."""
        folder = resolve_dir(path_or_hub_id, allow_patterns=["*.json", "*.model", VOCAB_TXT])
        tcfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
        mcfg = _read_json(os.path.join(folder, "config.json"))
        extra_ids = int(tcfg.get("extra_ids", 100))
        if os.path.isfile(os.path.join(folder, SPIECE)):
            tok = cls(SentencePieceVocab(os.path.join(folder, SPIECE), extra_ids), "sentencepiece", extra_ids, legacy, folder)
        elif tcfg.get("megatron_tokenizer_type") in WORDPIECE_TYPES:
            vocab = os.path.join(folder, VOCAB_TXT)
            tok = cls.wordpiece(vocab, WORDPIECE_TYPES[tcfg["megatron_tokenizer_type"]], extra_ids, vocab, folder)
        elif os.path.isfile(os.path.join(folder, TOKENIZER_JSON)):
            tok = cls(TokenizersVocab(os.path.join(folder, TOKENIZER_JSON)), "tokenizers", extra_ids, legacy, folder)
        elif tcfg.get("tokenizer_class") == "ByT5Tokenizer" or mcfg.get("vocab_size") == 384:
            tok = cls.byt5()
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer found; expected {SPIECE}, {TOKENIZER_JSON}, or a "
                                    "ByT5 config (tokenizer_class ByT5Tokenizer or vocab_size 384)")
        added = tcfg.get("t5kit_added_tokens", [])  # written by save_pretrained after `add_special_tokens`
        if added and tok.kind == "tokenizers":
            tok.vocab_size -= len(added)  # tokenizer.json holds them already, on top of every other id
        tok.add_special_tokens(added)
        if "vocab_size" in mcfg:
            tok.check_model_vocab(int(mcfg["vocab_size"]), os.path.join(folder, "config.json"))
        return tok

    @classmethod
    def byt5(cls) -> "Tokenizer":
        return cls(ByteVocab(), "byt5", extra_ids=0, source="byt5")

    @classmethod
    def wordpiece(cls, vocab_file: str, lower_case: bool, extra_ids: int = 100, where: str | None = None,
                  source: str | None = None) -> "Tokenizer":
        """Megatron's BERT WordPiece over `vocab_file` with T5's roles (`WordPieceVocab`)."""
        return cls(WordPieceVocab(vocab_file, lower_case, extra_ids, where or vocab_file), "wordpiece", extra_ids,
                   source=source or vocab_file)

    @classmethod
    def from_megatron(cls, tokenizer_type: str | None, tokenizer_model: str | None = None,
                      vocab_file: str | None = None, vocab_extra_ids: int = 100) -> "Tokenizer":
        """Megatron-LM's --tokenizer-type with its --tokenizer-model / --vocab-file / --vocab-extra-ids
        (no type with a --vocab-file: BertWordPieceLowerCase, the default of Megatron's pretrain_t5.py):
        - BertWordPieceCase, BertWordPieceLowerCase: --vocab-file, BERT's vocab.txt (`WordPieceVocab`);
        - SentencePieceTokenizer: --tokenizer-model, a SentencePiece model with T5's ids (pad 0, eos 1,
          unk 2), the sentinels on top as HF's T5Tokenizer puts them. (Megatron's own wrapper first
          appends <CLS> <SEP> <EOD> <MASK> <BOS>, which T5's span corruption does not use.);
        - HuggingFaceTokenizer: --tokenizer-model, a directory or hub id read by `from_pretrained`
          (its sentinels are its own, as in Megatron)."""
        if tokenizer_type is None and not vocab_file:
            raise ValueError(f"--tokenizer-model {tokenizer_model} needs --tokenizer-type SentencePieceTokenizer or "
                             "HuggingFaceTokenizer")
        tokenizer_type = tokenizer_type or "BertWordPieceLowerCase"
        if tokenizer_type not in MEGATRON_TYPES:
            raise ValueError(f"--tokenizer-type {tokenizer_type!r}: expected one of {', '.join(MEGATRON_TYPES)}")
        flag, value = ("--vocab-file", vocab_file) if tokenizer_type in WORDPIECE_TYPES else \
            ("--tokenizer-model", tokenizer_model)
        if not value:
            raise ValueError(f"--tokenizer-type {tokenizer_type} needs {flag}")
        if tokenizer_type == "HuggingFaceTokenizer":
            try:
                return cls.from_pretrained(tokenizer_model)
            except (FileNotFoundError, NotADirectoryError) as e:
                raise FileNotFoundError(f"--tokenizer-model {e}") from None
        if vocab_extra_ids < 1:
            raise ValueError(f"--vocab-extra-ids {vocab_extra_ids}: span corruption needs sentinels (T5 has 100)")
        if tokenizer_type in WORDPIECE_TYPES:
            return cls.wordpiece(vocab_file, WORDPIECE_TYPES[tokenizer_type], vocab_extra_ids, f"{flag} {vocab_file}")
        if not os.path.isfile(tokenizer_model):
            raise FileNotFoundError(f"{flag} {tokenizer_model}: no such file (expected a SentencePiece .model)")
        return cls(SentencePieceVocab(tokenizer_model, vocab_extra_ids), "sentencepiece", vocab_extra_ids,
                   source=tokenizer_model)

    def check_model_vocab(self, model_vocab: int, source: str = "model config") -> None:
        """T5 pads the embedding up to a multiple of 128 (32100 -> 32128; ByT5 259 + 125 -> 384)."""
        n = len(self)
        if not n <= model_vocab < n + 128:
            raise ValueError(f"{source}: vocab_size={model_vocab} does not fit tokenizer {self.source!r} with "
                             f"{n} ids; expected {n}..{n + 127}")

    def __len__(self) -> int:
        """Every id: `vocab_size` (the vocabulary and its sentinels) and the added tokens above it."""
        return self.vocab_size + len(self.added)

    def add_special_tokens(self, tokens: Sequence[str]) -> list[int]:
        """The ids of `tokens`, special tokens such as UL2's mode tokens [NLU] [NLG] [S2S] (issue 20);
        those the vocabulary lacks are appended after every id, as transformers' `add_special_tokens`
        appends them, so the sentinels keep their ids. `encode` parses them in task text (not in corpus
        text), `len` counts them, and `save_pretrained` writes them (tokenizer.json too)."""
        if tokens and self.kind == "byt5":
            raise ValueError(f"ByT5's byte vocabulary takes no added tokens ({' '.join(tokens)})")
        from tokenizers import AddedToken
        tk = getattr(self.backend, "tk", None)  # tokenizer.json and WordPiece: their own vocabulary learns them
        for t in tokens:
            if t in self.specials:
                continue
            i = self.backend.sp.piece_to_id(t) if self.kind == "sentencepiece" else tk.token_to_id(t)
            if i is None or i >= self.vocab_size or (self.kind == "sentencepiece" and i == UNK):
                i = len(self)
                self.added.append(t)
                if tk is not None:
                    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)])
                    if tk.token_to_id(t) != i:
                        raise ValueError(f"{self.source}: {t} has id {tk.token_to_id(t)} in its tokenizer.json, "
                                         f"expected {i} (after every other id)")
            self.specials[t] = i
        self._special = self._specials_pattern()
        return [self.specials[t] for t in tokens]

    def fingerprint(self) -> str:
        """Identity of the id mapping, recorded in token stores: kind, size, hash of the vocabulary."""
        import hashlib
        if self.kind == "sentencepiece":
            blob = self.backend.model_bytes
        elif self.kind == "tokenizers":
            blob = self.backend.tk.to_str().encode()
        elif self.kind == "wordpiece":  # the vocabulary and the casing; sentinels and [BOS]/[EOS] are in the size
            blob = json.dumps([self.backend.lower_case, self.backend.tokens]).encode()
        else:
            blob = b"byt5"
        return f"{self.kind}:{self.vocab_size}:{hashlib.sha256(blob).hexdigest()[:16]}"

    # ---- ids ----

    def sentinel_id(self, i: int) -> int:
        """`<extra_id_i>`: counts down from the top (seqio); ByT5 from 258 (byte 0xFF + 3)."""
        top = 255 + BYTE_OFFSET if self.kind == "byt5" else self.vocab_size - 1
        return top - i

    def encode(self, text: str, add_eos: bool = True, parse_special: bool = True) -> list[int]:
        """Text -> ids, ending in EOS with add_eos.

        parse_special=True, for task text (fine-tuning and evaluation inputs and targets, prompts): the
        special tokens' text (`</s>`, `<pad>`, `<extra_id_0>`, ...) becomes their ids, as transformers'
        T5 tokenizers do by default. Fine-tuning parity with transformers (test_parity) needs the same
        ids, and span-filling prompts write their sentinels this way ("The <extra_id_0> walks").
        parse_special=False, for corpus text (pretraining documents, `store.py`): every character is
        text, as seqio encodes (its vocabularies parse no special tokens), so a document that mentions
        `</s>` puts no EOS or sentinel into the span-corruption stream (issue 18)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if self.kind == "sentencepiece":
            text = text.replace("\u2581", " ")  # a literal '▁' is a space, as in transformers
        if not parse_special:
            ids = self.backend.encode_text(text) if text else []
            return ids + [self.eos_id] if add_eos else ids
        ids: list[int] = []
        after_special = False
        for j, part in enumerate(self._special.split(text)):
            if j % 2:  # a special token's text
                ids.append(self.specials[part])
                after_special = True
            elif part:
                ids.extend(self.backend.encode(part, after_special and not self.legacy))
                after_special = False
        return ids + [self.eos_id] if add_eos else ids

    def is_special(self, i: int) -> bool:
        if i >= self.vocab_size:  # an added token
            return True
        if self.kind == "wordpiece":
            return i in self.backend.special_ids
        return i < BYTE_OFFSET or (self.kind == "sentencepiece" and i >= self.backend.base)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        if self.kind == "wordpiece":  # words are space-separated: decoded whole, as transformers does
            return self.backend.tk.decode([int(x) for x in ids], skip_special_tokens=skip_special_tokens)
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
        if i >= self.vocab_size:
            return self.added[i - self.vocab_size]
        if self.kind == "wordpiece":
            return self.backend.tk.id_to_token(i)
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
            write_json(os.path.join(out_dir, TOKENIZER_JSON), _tokenizer_json(self.backend, self.extra_ids, self.added))
        elif self.kind == "tokenizers":
            self.backend.tk.save(os.path.join(out_dir, TOKENIZER_JSON))
        elif self.kind == "wordpiece":  # vocab.txt for Megatron's --vocab-file; tokenizer.json for transformers
            write_text(os.path.join(out_dir, VOCAB_TXT), "".join(t + "\n" for t in self.backend.tokens))
            write_text(os.path.join(out_dir, TOKENIZER_JSON), self.backend.tk.to_str())
        config = _tokenizer_config(self)
        if self.added:  # for transformers (additional_special_tokens) and for `from_pretrained` (t5kit_added_tokens)
            config.update(additional_special_tokens=config["additional_special_tokens"] + self.added,
                          t5kit_added_tokens=self.added)
        write_json(os.path.join(out_dir, "tokenizer_config.json"), config)


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
    if tok.kind == "wordpiece":
        b = tok.backend
        return {"tokenizer_class": "PreTrainedTokenizerFast", "extra_ids": tok.extra_ids,
                "megatron_tokenizer_type": next(k for k, lower in WORDPIECE_TYPES.items() if lower == b.lower_case),
                "pad_token": "[PAD]", "eos_token": "[EOS]", "unk_token": "[UNK]",
                "additional_special_tokens": [f"<extra_id_{i}>" for i in range(tok.extra_ids)]}
    return {"tokenizer_class": "T5Tokenizer", "extra_ids": tok.extra_ids, "legacy": tok.legacy,
            "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
            "additional_special_tokens": [f"<extra_id_{i}>" for i in range(tok.extra_ids)]}


def _tokenizer_json(sp: SentencePieceVocab, extra_ids: int, added: Sequence[str] = ()) -> dict:
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
                           ["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in reversed(range(extra_ids))]
                           + list(added)])  # added tokens after the sentinels: ids base + extra_ids + k
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
    tok = Tokenizer(SentencePieceVocab(path, extra_ids), "sentencepiece", extra_ids, source=out_dir)
    tok.save_pretrained(out_dir)
    return tok

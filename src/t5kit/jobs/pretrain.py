"""`t5kit pretrain`: pretraining with Megatron-LM pretrain_t5.py's flags, by span corruption (the
default), UL2's mixture of denoisers or a prefix LM (--objective, data/objectives.py).

The data is t5kit token stores, Megatron-LM indexed datasets (PREFIX.bin / .idx) and text files to
tokenize (a tokenizer is trained on them when none is given), blended by Megatron's
`--data-path W1 P1 W2 P2 ...` and split into train / valid / test documents by `--split`; or with no
--data-path the embedded corpus and a small model that trains in minutes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import numpy as np

from ..data.embedded import write_embedded_corpus
from ..data.objectives import MODE_TOKENS, build_objective, check_objective, example_record, parse_rates
from ..data.pretraining import DataConfig, SpanCorruptionBatches, held_out_batches
from ..data.corpus import check_corpus, expand_inputs
from ..data.sources import Blend, parse_blend, parse_split, split_sources
from ..data.store import build_token_store, is_store, open_store, unigram_entropy
from ..data.tokenizer import train_tokenizer
from ..options import option
from ..training import parallel
from ..training.loop import HeldOut, train, write_run_config
from .common import LoopConfig, describe, load_model, resolve_model_dir, say, setup, tokenizer_for

MEGATRON_MODEL = {"encoder_num_layers": "num_layers", "decoder_num_layers": "num_decoder_layers",
                  "hidden_size": "d_model", "num_attention_heads": "num_heads", "kv_channels": "d_kv",
                  "ffn_hidden_size": "d_ff"}


@dataclass
class PretrainConfig(LoopConfig):
    """Pretraining (--objective: span corruption, UL2 or a prefix LM); the fields are Megatron-LM
    pretrain_t5.py's flags."""
    save: str = "runs/pretrain"
    data_path: list[str] | None = option("corpora: t5kit token stores, Megatron PREFIX (.bin/.idx), text files, "
                                         "directories or globs (.txt .jsonl .json, also .gz / .zst; .parquet); a "
                                         "blend is W1 P1 W2 P2 ...", default=None)
    model_preset: str | None = option("architecture preset (default t5-v1_1-base)", default=None)
    model: str | None = option("start from this HF checkpoint (directory or hub id)", default=None)
    tokenizer: str | None = option("tokenizer directory; default: the --model's, else --tokenizer-type's, else one "
                                   "trained on the data",
                                   default=None)
    vocab_size: int = option("pieces of the tokenizer trained when none is given", default=2000)
    tokenizer_type: str | None = option("Megatron-LM's tokenizer: BertWordPieceCase | BertWordPieceLowerCase (with "
                                        "--vocab-file; the type when only --vocab-file is given, as in pretrain_t5.py)"
                                        " | SentencePieceTokenizer | HuggingFaceTokenizer (with --tokenizer-model)",
                                        default=None)
    tokenizer_model: str | None = option("SentencePiece .model file, or HuggingFaceTokenizer's directory or hub id",
                                         default=None)
    vocab_file: str | None = option("BERT's vocab.txt for the BertWordPiece types ([PAD] 0; [BOS], [EOS] and the "
                                    "sentinels are appended as in Megatron, <extra_id_0> on top)", default=None)
    vocab_extra_ids: int = option("sentinels (<extra_id_N>) appended to the vocabulary", default=100)
    encoder_num_layers: int | None = None
    decoder_num_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    kv_channels: int | None = None
    ffn_hidden_size: int | None = None
    seq_length: int = 512
    decoder_seq_length: int | None = None
    max_position_embeddings: int | None = option("checked (>= --seq-length), otherwise unused: T5 has "
                                                 "relative positions", default=None)
    z_loss: float = 0.0
    eval_iters: int = option("held-out batches (of min(--micro-batch-size, 4) rows) evaluated every --eval-interval: "
                             "the same ones each time, split over the data-parallel ranks, kept in checkpoints (a "
                             "resumed run evaluates on its checkpoint's)", default=4)
    workers: int = 1
    skip_bad_lines: bool = option("skip (and count) bad corpus lines: not UTF-8, not a JSON object, text null or not "
                                  "a string", default=False)
    drop_remainders: bool = option("drop short group tails instead of packing them", default=False)
    objective: str = option("span (T5's span corruption) | ul2 (UL2's seven denoisers, their mode tokens [NLU] [NLG] "
                            "[S2S] added to the tokenizer) | prefix-lm (UL2's S denoiser without a mode token)",
                            default="span")
    denoiser_rates: list[str] | None = option("with --objective ul2: mixing weights NAME=WEIGHT, NAME one of R1 R2 X1 "
                                              "X2 X3 X4 S (normalised; unnamed ones 0; default: all equal, as the "
                                              "paper)", default=None)
    show_examples: int = option("print this many examples of the training stream as JSON lines and exit without "
                                "training", default=0)
    text_field: str = option("the field (JSON lines) or column (parquet) holding a document's text", default="text")
    split: str = option("train,valid,test shares of each corpus' documents, as Megatron's --split; the valid part "
                        "is the held-out set", default="969,30,1")

    @staticmethod
    def implied(given: dict) -> dict:
        """With no --data-path: the embedded corpus and a small model that trains in minutes."""
        if given.get("data_path"):
            return {}
        return dict(model_preset="tiny", seq_length=128, micro_batch_size=16, train_iters=1500, lr=3e-3,
                    lr_warmup_iters=100, eval_interval=100, save_interval=500)


def pretrain(cfg: PretrainConfig, progress: bool = True) -> dict | None:
    """Pretraining with --objective; -> the last log row, with the run's `final` export path (None
    with --show-examples, which prints examples and trains nothing)."""
    import torch

    from ..model.config import get_preset
    from ..model.t5 import T5

    out = cfg.save
    layout = setup(cfg)
    main = layout.rank == 0
    if cfg.max_position_embeddings is not None and cfg.max_position_embeddings < cfg.seq_length:
        raise ValueError(f"--max-position-embeddings {cfg.max_position_embeddings} < --seq-length "
                         f"{cfg.seq_length} (T5 uses relative positions; the flag is only checked)")
    rates = parse_rates(cfg.denoiser_rates)
    check_objective(cfg.objective, rates)  # before any tokenizing
    if cfg.show_examples < 0:
        raise ValueError(f"--show-examples {cfg.show_examples}: expected a number of examples >= 0")
    if cfg.eval_interval and cfg.eval_iters < 1:
        raise ValueError(f"--eval-iters {cfg.eval_iters}: expected at least 1 held-out batch (--eval-interval 0 "
                         f"turns evaluation off)")
    # data: stores, Megatron datasets and text files, blended by weight; or the embedded corpus
    weights, specs = parse_blend(cfg.data_path) if cfg.data_path else (None, [os.path.join(out, "corpus.txt")])
    if not cfg.data_path:
        if main:
            say(f"embedded corpus: {write_embedded_corpus(specs[0])} chapters (King James + World English Bible)"
                 f" -> {specs[0]}")
        parallel.barrier()
    corpora = _corpora(weights, specs)
    paths = [p for c in corpora if isinstance(c, list) for p in c]  # text files, for the tokenizer
    store_dir = next((c for c in corpora if isinstance(c, str)), None)
    megatron_tok = {k: getattr(cfg, k) for k in ("tokenizer_type", "tokenizer_model", "vocab_file", "vocab_extra_ids")}
    given = cfg.tokenizer or cfg.model or cfg.tokenizer_type or cfg.tokenizer_model or cfg.vocab_file
    tok = tokenizer_for(cfg.model, cfg.tokenizer, **megatron_tok) if given else None  # bad flags named before the scan
    if main:
        for files in (c for c in corpora if isinstance(c, list)):
            n_docs = check_corpus(files, cfg.skip_bad_lines, cfg.text_field)  # before SentencePiece sees the text
            say(f"corpus: {n_docs:,} documents in {len(files)} file(s)")
    if tok is None:
        # rank 0 prepares tokenizer and token store; the others wait, then read them
        if store_dir is not None:
            raise ValueError(f"{store_dir}: a token store needs the tokenizer it was built with (--tokenizer, or "
                             "--tokenizer-type and its files)")
        tok_dir = os.path.join(out, "tokenizer")
        if main:
            from ..data.corpus import iter_documents
            say(f"training a {cfg.vocab_size}-piece SentencePiece tokenizer -> {tok_dir}")
            train_tokenizer((d for p in paths for d in iter_documents(p, cfg.skip_bad_lines, cfg.text_field)),
                            cfg.vocab_size, tok_dir, extra_ids=cfg.vocab_extra_ids)
        parallel.barrier()
        tok = tokenizer_for(None, tok_dir)
    stores = _open_stores(corpora, tok, cfg, main, progress)
    # the objective (issue 20): UL2's mode tokens join the tokenizer, after every id, before the model's vocabulary
    # is sized or checked; --decoder-seq-length bounds its denoisers' targets (span keeps Megatron's check below),
    # and the sentinels their span count (ByT5's count down through the bytes)
    mode_ids = dict(zip(MODE_TOKENS, tok.add_special_tokens(MODE_TOKENS))) if cfg.objective == "ul2" else None
    objective = build_objective(cfg.objective, cfg.seq_length, None if cfg.objective == "span" else
                                cfg.decoder_seq_length, rates, first_sentinel=tok.sentinel_id(0), eos=tok.eos_id,
                                mode_ids=mode_ids, sentinels=None if tok.kind == "byt5" else tok.extra_ids)
    # model
    if cfg.model:
        model = load_model(resolve_model_dir(cfg.model), tok)
    else:
        base = get_preset(cfg.model_preset or "t5-v1_1-base")
        shape = {MEGATRON_MODEL[k]: getattr(cfg, k) for k in MEGATRON_MODEL if getattr(cfg, k) is not None}
        if "num_layers" in shape and "num_decoder_layers" not in shape:
            shape["num_decoder_layers"] = shape["num_layers"]
        with torch.device("meta"):  # initialised by train() once parallelised: never whole on one rank
            model = T5(base.replace(vocab_size=-(-len(tok) // 128) * 128, eos_token_id=tok.eos_id, dropout_rate=0.0,
                                    **shape))
    model_cfg = model.config
    tok.check_model_vocab(model_cfg.vocab_size, "model")
    # --split cuts each corpus' documents into train / valid / test as Megatron does; the first
    # --eval-iters batches of the valid part are evaluated every time, alike under every layout (issue 17)
    dcfg = DataConfig(inputs_length=cfg.seq_length, seed=cfg.seed)
    raw_len, split = objective.segment_length, parse_split(cfg.split)
    train_part, valid_part = (split_sources(stores, weights, split, raw_len, cfg.seed, part) for part in (0, 1))
    names = ", ".join(f"{s.name} ({s.n_docs:,} documents)" for s in stores)
    if train_part is None:
        raise ValueError(f"--split {cfg.split}: no document is left for training in {names}")
    common = dict(eos=tok.eos_id, pad=tok.pad_id, pack=not cfg.drop_remainders, objective=objective)
    batches = SpanCorruptionBatches(train_part, dcfg, tok.sentinel_id(0), cfg.micro_batch_size,
                                    rank=layout.dp_rank, world=layout.dp, **common)
    if cfg.show_examples:  # the stream's first examples as this rank reads them, then no training
        if main:
            for ex in batches.upcoming(cfg.show_examples):
                print(json.dumps(example_record(*ex, lambda ids: tok.decode(ids, skip_special_tokens=False))))
        return None
    held_out = None
    if cfg.eval_interval:
        if valid_part is None:
            raise ValueError(f"--split {cfg.split}: no document is left for validation in {names}; give the valid "
                             f"share more weight, or --eval-interval 0")
        held_out = HeldOut(held_out_batches(valid_part, dcfg, tok.sentinel_id(0), min(cfg.micro_batch_size, 4),
                                            cfg.eval_iters, **common), layout, cfg.bf16)
    if cfg.decoder_seq_length is not None and cfg.decoder_seq_length < batches.targets_length:
        raise ValueError(f"--decoder-seq-length {cfg.decoder_seq_length} < {batches.targets_length}, the "
                         f"targets length span corruption gives for --seq-length {cfg.seq_length}")
    tcfg, ocfg = cfg.loop(layout, z_loss=cfg.z_loss)
    if main:
        write_run_config(out, model=model_cfg.to_hf_json(), train=tcfg, optim=ocfg, data=dcfg, flags=asdict(cfg))
        say(f"parameters: {model_cfg.num_params():,}; {describe(layout, cfg)}; raw segment {batches.raw_len} -> "
             f"inputs {dcfg.inputs_length}, targets {batches.targets_length}; {len(batches.segments)} training "
             f"segments ({'short ones packed' if batches.pack else 'short ones dropped'}); unigram baseline "
             f"{_unigram_baseline(stores, train_part):.3f} nats/token")
        if objective.name != "span":
            say(f"objective {objective.name}: " + ", ".join(
                f"{d.name} {r:.0%} ({d.raw_length} raw -> {d.inputs_length} / {d.targets_length})"
                for d, r in zip(objective.denoisers, objective.rates))
                + f"; an example uses {objective.token_share:.0%} of its segment on average")
        if isinstance(train_part, Blend):
            say(f"blend, per epoch: {batches.segments.describe()}")
        if cfg.drop_remainders:
            n, tokens = train_part.remainders()
            say(f"--drop-remainders: {n:,} short group tails ({tokens:,} tokens, "
                f"{tokens / max(train_part.n_tokens(), 1):.2%} of the training tokens) left out of every epoch")

    row = train(model, batches, held_out, tcfg, ocfg, tokenizer=tok, layout=layout, progress=progress,
                resume=cfg.resume_from())
    return {**row, "final": os.path.join(out, "final")}


def _corpora(weights: list[float] | None, specs: list[str]) -> list[str | list[str]]:
    """Each corpus as a store (a t5kit store folder or Megatron prefix) or its text files. Without
    weights, the text files together make one corpus; in a blend each item is a corpus."""
    if weights is None:
        texts = [s for s in specs if not is_store(s)]
        return [s for s in specs if is_store(s)] + ([expand_inputs(texts)] if texts else [])
    return [s if is_store(s) else expand_inputs([s]) for s in specs]


def _open_stores(corpora: list, tok, cfg: PretrainConfig, main: bool, progress: bool) -> list:
    """Rank 0 tokenizes the text corpora into stores under --save and scans Megatron .bin files for
    ids past the vocabulary (cached beside them); then every rank opens them all and checks."""
    n_text = sum(isinstance(c, list) for c in corpora)
    specs = []
    for i, c in enumerate(corpora):
        if isinstance(c, list):
            folder = os.path.join(cfg.save, "data" if n_text == 1 else f"data-{i}")
            if main:
                build_token_store(c, tok, folder, workers=cfg.workers, skip_bad_lines=cfg.skip_bad_lines,
                                  progress=progress, text_field=cfg.text_field)
            c = folder
        specs.append(c)
    if main:
        for spec in specs:
            open_store(spec, tok).scan()
    parallel.barrier()
    stores = [open_store(spec, tok) for spec in specs]
    for store in stores:
        store.check_vocab(len(tok))
    return stores


def _unigram_baseline(stores: list, source) -> float:
    """Entropy of the training mixture's token frequencies (each store's from its header, or a
    10M-token sample of Megatron data), the stores weighted by their share of an epoch's examples."""
    shares = source.counts / source.counts.sum() if isinstance(source, Blend) else [1.0]
    mix = np.zeros(1)
    for share, store in zip(shares, stores):
        counts = store.unigram().astype(np.float64)
        p = share * counts / max(counts.sum(), 1.0)
        mix = np.pad(mix, (0, max(0, len(p) - len(mix)))) + np.pad(p, (0, max(0, len(mix) - len(p))))
    return unigram_entropy(mix)

"""`t5kit pretrain`: span-corruption pretraining with Megatron-LM pretrain_t5.py's flags.

The data is a token store, text files to tokenize (a tokenizer is trained on them when none is
given), or with no --data-path the embedded corpus and a small model that trains in minutes.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from ..data.embedded import write_embedded_corpus
from ..data.pretraining import DataConfig, SpanCorruptionBatches, held_out_batches, raw_segments
from ..data.readers import check_corpus
from ..data.spans import random_spans_helper
from ..data.store import TokenStore, build_token_store
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
    """Span-corruption pretraining; the fields are Megatron-LM pretrain_t5.py's flags."""
    save: str = "runs/pretrain"
    data_path: list[str] | None = option("token store dir, or .txt / .jsonl / .parquet files", default=None)
    model_preset: str | None = option("architecture preset (default t5-v1_1-base)", default=None)
    model: str | None = option("start from this HF checkpoint (directory or hub id)", default=None)
    tokenizer: str | None = option("tokenizer directory; default: the --model's, else one trained on the data",
                                   default=None)
    vocab_size: int = option("pieces of the tokenizer trained when none is given", default=2000)
    vocab_extra_ids: int = 100
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
    skip_bad_lines: bool = option("skip (and count) corpus lines that are not UTF-8", default=False)
    drop_remainders: bool = option("drop short group tails instead of packing them", default=False)

    @staticmethod
    def implied(given: dict) -> dict:
        """With no --data-path: the embedded corpus and a small model that trains in minutes."""
        if given.get("data_path"):
            return {}
        return dict(model_preset="tiny", seq_length=128, micro_batch_size=16, train_iters=1500, lr=3e-3,
                    lr_warmup_iters=100, eval_interval=100, save_interval=500)


def pretrain(cfg: PretrainConfig, progress: bool = True) -> dict:
    """Span-corruption pretraining; -> the last log row, with the run's `final` export path."""
    import torch

    from ..model.config import get_preset
    from ..model.t5 import T5

    out = cfg.save
    layout = setup(cfg)
    main = layout.rank == 0
    if cfg.max_position_embeddings is not None and cfg.max_position_embeddings < cfg.seq_length:
        raise ValueError(f"--max-position-embeddings {cfg.max_position_embeddings} < --seq-length "
                         f"{cfg.seq_length} (T5 uses relative positions; the flag is only checked)")
    if cfg.eval_interval and cfg.eval_iters < 1:
        raise ValueError(f"--eval-iters {cfg.eval_iters}: expected at least 1 held-out batch (--eval-interval 0 "
                         f"turns evaluation off)")
    # data: an existing token store, text files to tokenize, or the embedded corpus
    paths = list(cfg.data_path or [])
    store_dir = paths[0] if len(paths) == 1 and os.path.isfile(os.path.join(paths[0], "header.json")) else None
    if not paths:
        paths = [os.path.join(out, "corpus.txt")]
        if main:
            say(f"embedded corpus: {write_embedded_corpus(paths[0])} chapters (King James + World English Bible)"
                 f" -> {paths[0]}")
        parallel.barrier()
    if store_dir is None and main:
        n_docs = check_corpus(paths, cfg.skip_bad_lines)  # before SentencePiece sees the text
        say(f"corpus: {n_docs:,} documents in {len(paths)} file(s)")
    tok_dir = cfg.tokenizer or cfg.model
    if not tok_dir:  # rank 0 prepares tokenizer and token store; the others wait, then read them
        if store_dir is not None:
            raise ValueError(f"{store_dir}: a token store needs the --tokenizer it was built with")
        tok_dir = os.path.join(out, "tokenizer")
        if main:
            from ..data.readers import iter_documents
            say(f"training a {cfg.vocab_size}-piece SentencePiece tokenizer -> {tok_dir}")
            train_tokenizer((d for p in paths for d in iter_documents(p, cfg.skip_bad_lines)), cfg.vocab_size,
                            tok_dir, extra_ids=cfg.vocab_extra_ids)
        parallel.barrier()
    tok = tokenizer_for(None, tok_dir)
    if store_dir is None:
        store_dir = os.path.join(out, "data")
        if main:
            build_token_store(paths, tok, store_dir, workers=cfg.workers, skip_bad_lines=cfg.skip_bad_lines,
                              progress=progress)
        parallel.barrier()
    store = TokenStore(store_dir, tok)
    # model
    if cfg.model:
        model = load_model(resolve_model_dir(cfg.model), tok)
    else:
        base = get_preset(cfg.model_preset or "t5-v1_1-base")
        shape = {MEGATRON_MODEL[k]: getattr(cfg, k) for k in MEGATRON_MODEL if getattr(cfg, k) is not None}
        if "num_layers" in shape and "num_decoder_layers" not in shape:
            shape["num_decoder_layers"] = shape["num_layers"]
        with torch.device("meta"):  # initialised by train() once parallelised: never whole on one rank
            model = T5(base.replace(vocab_size=-(-len(tok) // 128) * 128, dropout_rate=0.0, **shape))
    model_cfg = model.config
    tok.check_model_vocab(model_cfg.vocab_size, "model")
    # the last ~2% of segments (by corpus position) are held out for eval, disjoint from training; the
    # first --eval-iters batches of them are evaluated every time, alike under every layout (issue 17)
    dcfg = DataConfig(inputs_length=cfg.seq_length, seed=cfg.seed)
    segments = raw_segments(store.offsets, random_spans_helper(dcfg.inputs_length)[0])
    n_eval = max(8, len(segments) // 50)
    common = dict(eos=tok.eos_id, pad=tok.pad_id, pack=not cfg.drop_remainders)
    batches = SpanCorruptionBatches(store.tokens, segments[:-n_eval], dcfg, tok.sentinel_id(0), cfg.micro_batch_size,
                                    rank=layout.dp_rank, world=layout.dp, **common)
    held_out = HeldOut(held_out_batches(store.tokens, segments[-n_eval:], dcfg, tok.sentinel_id(0),
                                        min(cfg.micro_batch_size, 4), cfg.eval_iters, **common), layout, cfg.bf16)
    if cfg.decoder_seq_length is not None and cfg.decoder_seq_length < batches.targets_length:
        raise ValueError(f"--decoder-seq-length {cfg.decoder_seq_length} < {batches.targets_length}, the "
                         f"targets length span corruption gives for --seq-length {cfg.seq_length}")
    tcfg, ocfg = cfg.loop(layout, z_loss=cfg.z_loss)
    if main:
        write_run_config(out, model=model_cfg.to_hf_json(), train=tcfg, optim=ocfg, data=dcfg, flags=asdict(cfg))
        say(f"parameters: {model_cfg.num_params():,}; {describe(layout, cfg)}; raw segment {batches.raw_len} -> "
             f"inputs {dcfg.inputs_length}, targets {batches.targets_length}; {len(batches.segments)} training "
             f"segments ({'short ones packed' if batches.pack else 'short ones dropped'}); unigram baseline "
             f"{unigram_entropy(store.tokens):.3f} nats/token")

    row = train(model, batches, held_out, tcfg, ocfg, tokenizer=tok, layout=layout, progress=progress,
                resume=cfg.resume_from())
    return {**row, "final": os.path.join(out, "final")}


def unigram_entropy(tokens) -> float:
    """Entropy (nats) of the corpus' token frequencies: the loss of a model that ignores context."""
    import numpy as np
    p = np.bincount(np.asarray(tokens)).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())

"""The jobs as functions: `pretrain`, `finetune`, `evaluate`, `embed` (config dataclasses in,
results out).

Each job prepares its tokenizer, data, model and run directory the same way (`_tokenizer_for`,
`resolve_model_dir`, `_setup`), checks its input before any heavy work, and writes its resolved
configuration to <save>/run_config.json. The flag names are the dataclass fields with dashes
(`cli.py` derives the flags from these dataclasses); `resolve` layers defaults < TOML recipe <
explicit values, as the command line does.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields

from ..data.spans import random_spans_helper
from ..data.store import (
    DataConfig,
    SpanCorruptionBatches,
    TokenStore,
    build_token_store,
    check_corpus,
    raw_segments,
    write_embedded_corpus,
)
from ..data.tasks import (
    BadLine,
    TaskBatches,
    TaskSource,
    eval_batches,
    mixture_rates,
    parse_source,
    read_examples,
    tokenize_task,
    utf8_lines,
)
from ..data.tokenizer import Tokenizer, train_tokenizer
from ..training import checkpoint, parallel
from ..training.loop import FREEZE_PARTS, TrainConfig, freeze, train, write_run_config
from ..training.loop import evaluate as loss_eval
from ..training.optim import OptimConfig
from .metrics import check_metrics, compute


def _say(msg: str) -> None:
    if parallel.is_main():
        print(f"t5kit: {msg}", file=sys.stderr)


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


# ---- configuration ----

def resolve(cls, recipe: str | None = None, values: dict | None = None):
    """cls(defaults < cls.implied(...) < TOML recipe < values). Recipe keys are the flag names
    (dashes or underscores); an unknown key is an error naming the file."""
    import tomllib

    known = {f.name for f in fields(cls)}
    from_recipe = {}
    if recipe:
        try:
            with open(recipe, "rb") as f:
                from_recipe = {k.replace("-", "_"): v for k, v in tomllib.load(f).items()}
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{recipe}: cannot read TOML recipe ({e})") from None
        unknown = sorted(set(from_recipe) - known)
        if unknown:
            raise ValueError(f"{recipe}: unknown keys {unknown}; expected flags of this command's --help")
    given = {**from_recipe, **(values or {})}
    implied = getattr(cls, "implied", lambda _: {})(given)
    return cls(**{**implied, **given})


def to_flags(cfg, skip: tuple[str, ...] = ()) -> list[str]:
    """The command-line flags that reproduce `cfg` (fields that differ from their defaults)."""
    out = []
    defaults = type(cfg)()
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in skip or value == getattr(defaults, f.name) or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


# ---- shared preparation ----

def resolve_model_dir(spec: str) -> str:
    """An HF directory, a hub id, or a `t5kit pretrain` / `finetune` output: the run directory
    itself means its `final` export."""
    if os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, "config.json")) \
            and os.path.isfile(os.path.join(spec, "final", "config.json")):
        return os.path.join(spec, "final")
    return spec


def _tokenizer_for(model_dir: str | None, tokenizer: str | None) -> Tokenizer:
    where = tokenizer or model_dir
    try:
        return Tokenizer.from_pretrained(where)
    except FileNotFoundError as e:
        if tokenizer is None and "no tokenizer found" in str(e):
            raise FileNotFoundError(f"{e}; pass --tokenizer DIR") from None
        raise


def _setup(cfg: "LoopConfig") -> parallel.Layout:
    """The process group and mesh of a training job (a bad layout stops every rank alike)."""
    layout = parallel.init(cfg.device, cfg.tensor_model_parallel_size)
    if cfg.save and layout.rank == 0:
        os.makedirs(cfg.save, exist_ok=True)
    return layout


def _load_model(model_dir: str, tok: Tokenizer):
    from ..model.hf import from_pretrained
    from ..model.t5 import T5
    model = from_pretrained(T5, model_dir)
    tok.check_model_vocab(model.config.vocab_size, f"{model_dir}/config.json")
    return model


# ---- pretrain ----

# Megatron-LM pretrain_t5.py flags -> T5Config fields. Same names, same meaning.
MEGATRON_MODEL = {"encoder_num_layers": "num_layers", "decoder_num_layers": "num_decoder_layers",
                  "hidden_size": "d_model", "num_attention_heads": "num_heads", "kv_channels": "d_kv",
                  "ffn_hidden_size": "d_ff"}


@dataclass
class LoopConfig:
    """The training-loop flags `pretrain` and `finetune` share (Megatron-LM's names and meaning)."""
    save: str = "runs/t5kit"
    load: str | None = _help("resume from the latest checkpoint of this --save directory (or a checkpoints "
                             "folder or one step_* checkpoint); with none there yet, start fresh", default=None)
    resume: bool = _help("shorthand for --load with the --save directory", default=False)
    finetune: bool = _help("with --load: load the weights only (optimizer, step, data and RNG start fresh)",
                           default=False)
    no_load_optim: bool = _help("with --load: do not restore the optimizer state", default=False)
    no_load_rng: bool = _help("with --load: do not restore the RNG states", default=False)
    exit_interval: int = _help("save a checkpoint and exit cleanly after this many steps (a restart with the "
                               "same command continues)", default=0)
    exit_duration_in_mins: float = _help("save a checkpoint and exit cleanly after this many minutes of training",
                                         default=0.0)
    tensorboard_dir: str | None = _help("write TensorBoard scalars here", default=None)
    parallel: str = _help("how data-parallel ranks hold the model under torchrun: ddp (whole replicas) | fsdp "
                          "(FSDP2: parameters, gradients and optimizer state sharded)", default="ddp")
    tensor_model_parallel_size: int = _help("split every layer over this many ranks (Megatron's layout); "
                                            "the data-parallel size is the world size over it", default=1)
    recompute_activations: bool = _help("activation checkpointing per block: recompute in backward instead "
                                        "of keeping activations", default=False)
    compile: str = _help("torch.compile the training step: none | block (each encoder and decoder block, "
                         "torchtitan's way) | model (the whole forward in one graph; not with --parallel fsdp); "
                         "the first step's time, compilation included, is logged as first_step_s",
                         default="none")
    micro_batch_size: int = 8
    global_batch_size: int | None = _help("micro batch x accumulation x data-parallel ranks (default: no "
                                          "accumulation)",
                                          default=None)
    train_iters: int = 1000
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 100
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    bf16: bool = False
    bf16_params: bool = _help("with --bf16: keep the weights in bf16 (cast once per step) and fp32 master weights "
                              "and optimizer state in the optimizer", default=False)
    seed: int = 1234
    device: str = "cpu"
    save_interval: int = 500
    eval_interval: int = 100
    log_interval: int = 10

    def loop(self, layout: parallel.Layout, **train) -> tuple[TrainConfig, OptimConfig]:
        """The loop's TrainConfig (with job-specific `train` fields) and OptimConfig."""
        tcfg = TrainConfig(out=self.save, steps=self.train_iters, micro_batch=self.micro_batch_size,
                           global_batch=self.global_batch_size or self.micro_batch_size * layout.dp,
                           clip_grad=self.clip_grad, bf16=self.bf16, save_interval=self.save_interval,
                           seed=self.seed, log_interval=self.log_interval, data_parallel=layout.dp,
                           parallel=self.parallel, recompute=self.recompute_activations, compile=self.compile,
                           bf16_params=self.bf16_params,
                           finetune=self.finetune, load_optim=not self.no_load_optim, load_rng=not self.no_load_rng,
                           exit_interval=self.exit_interval, exit_duration_mins=self.exit_duration_in_mins,
                           tensorboard_dir=self.tensorboard_dir, **{"eval_interval": self.eval_interval, **train})
        ocfg = OptimConfig(name=self.optimizer, lr=self.lr, min_lr=self.min_lr, schedule=self.lr_decay_style,
                           warmup_steps=min(self.lr_warmup_iters, self.train_iters), total_steps=self.train_iters,
                           weight_decay=self.weight_decay)
        return tcfg, ocfg

    def resume_from(self) -> str | None:
        """The checkpoint file to start from (Megatron's --load), or None to start fresh, saying
        why when --load named a place with no checkpoint yet."""
        where = self.load or (self.save if self.resume else None)
        if where is None:
            if self.finetune or self.no_load_optim or self.no_load_rng:
                raise ValueError("--finetune / --no-load-optim / --no-load-rng apply to --load DIR; give --load")
            return None
        found = checkpoint.latest(where)
        if found is None:
            _say(f"{where}: no checkpoint (step_*) yet: starting fresh")
        return found


@dataclass
class PretrainConfig(LoopConfig):
    """Span-corruption pretraining; the fields are Megatron-LM pretrain_t5.py's flags."""
    save: str = "runs/pretrain"
    data_path: list[str] | None = _help("token store dir, or .txt / .jsonl / .parquet files", default=None)
    model_preset: str | None = _help("architecture preset (default t5-v1_1-base)", default=None)
    model: str | None = _help("start from this HF checkpoint (directory or hub id)", default=None)
    tokenizer: str | None = _help("tokenizer directory; default: the --model's, else one trained on the data",
                                  default=None)
    vocab_size: int = _help("pieces of the tokenizer trained when none is given", default=2000)
    vocab_extra_ids: int = 100
    encoder_num_layers: int | None = None
    decoder_num_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    kv_channels: int | None = None
    ffn_hidden_size: int | None = None
    seq_length: int = 512
    decoder_seq_length: int | None = None
    max_position_embeddings: int | None = _help("checked (>= --seq-length), otherwise unused: T5 has "
                                                "relative positions", default=None)
    z_loss: float = 0.0
    eval_iters: int = 4
    workers: int = 1
    skip_bad_lines: bool = _help("skip (and count) corpus lines that are not UTF-8", default=False)
    drop_remainders: bool = _help("drop short group tails instead of packing them", default=False)

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
    layout = _setup(cfg)
    main = layout.rank == 0
    if cfg.max_position_embeddings is not None and cfg.max_position_embeddings < cfg.seq_length:
        raise ValueError(f"--max-position-embeddings {cfg.max_position_embeddings} < --seq-length "
                         f"{cfg.seq_length} (T5 uses relative positions; the flag is only checked)")
    # data: an existing token store, text files to tokenize, or the embedded corpus
    paths = list(cfg.data_path or [])
    store_dir = paths[0] if len(paths) == 1 and os.path.isfile(os.path.join(paths[0], "header.json")) else None
    if not paths:
        paths = [os.path.join(out, "corpus.txt")]
        if main:
            _say(f"embedded corpus: {write_embedded_corpus(paths[0])} chapters (King James + World English Bible)"
                 f" -> {paths[0]}")
        parallel.barrier()
    if store_dir is None and main:
        n_docs = check_corpus(paths, cfg.skip_bad_lines)  # before SentencePiece sees the text
        _say(f"corpus: {n_docs:,} documents in {len(paths)} file(s)")
    tok_dir = cfg.tokenizer or cfg.model
    if not tok_dir:  # rank 0 prepares tokenizer and token store; the others wait, then read them
        if store_dir is not None:
            raise ValueError(f"{store_dir}: a token store needs the --tokenizer it was built with")
        tok_dir = os.path.join(out, "tokenizer")
        if main:
            from ..data.store import iter_documents
            _say(f"training a {cfg.vocab_size}-piece SentencePiece tokenizer -> {tok_dir}")
            train_tokenizer((d for p in paths for d in iter_documents(p, cfg.skip_bad_lines)), cfg.vocab_size,
                            tok_dir, extra_ids=cfg.vocab_extra_ids)
        parallel.barrier()
    tok = _tokenizer_for(None, tok_dir)
    if store_dir is None:
        store_dir = os.path.join(out, "data")
        if main:
            build_token_store(paths, tok, store_dir, workers=cfg.workers, skip_bad_lines=cfg.skip_bad_lines,
                              progress=progress)
        parallel.barrier()
    store = TokenStore(store_dir, tok)
    # model
    if cfg.model:
        model = _load_model(resolve_model_dir(cfg.model), tok)
    else:
        base = get_preset(cfg.model_preset or "t5-v1_1-base")
        shape = {MEGATRON_MODEL[k]: getattr(cfg, k) for k in MEGATRON_MODEL if getattr(cfg, k) is not None}
        if "num_layers" in shape and "num_decoder_layers" not in shape:
            shape["num_decoder_layers"] = shape["num_layers"]
        with torch.device("meta"):  # initialised by train() once parallelised: never whole on one rank
            model = T5(base.replace(vocab_size=-(-len(tok) // 128) * 128, dropout_rate=0.0, **shape))
    model_cfg = model.config
    tok.check_model_vocab(model_cfg.vocab_size, "model")
    # the last ~2% of segments (by corpus position) are held out for eval, disjoint from training
    dcfg = DataConfig(inputs_length=cfg.seq_length, seed=cfg.seed)
    segments = raw_segments(store.offsets, random_spans_helper(dcfg.inputs_length)[0])
    n_eval = max(8, len(segments) // 50)
    common = dict(eos=tok.eos_id, pad=tok.pad_id, pack=not cfg.drop_remainders, rank=layout.dp_rank, world=layout.dp)
    batches = SpanCorruptionBatches(store.tokens, segments[:-n_eval], dcfg, tok.sentinel_id(0), cfg.micro_batch_size,
                                    **common)
    held_out = SpanCorruptionBatches(store.tokens, segments[-n_eval:], dcfg, tok.sentinel_id(0),
                                     min(cfg.micro_batch_size, 4), **common)
    if cfg.decoder_seq_length is not None and cfg.decoder_seq_length < batches.targets_length:
        raise ValueError(f"--decoder-seq-length {cfg.decoder_seq_length} < {batches.targets_length}, the "
                         f"targets length span corruption gives for --seq-length {cfg.seq_length}")
    tcfg, ocfg = cfg.loop(layout, z_loss=cfg.z_loss)
    if main:
        write_run_config(out, model=model_cfg.to_hf_json(), train=tcfg, optim=ocfg, data=dcfg, flags=asdict(cfg))
        _say(f"parameters: {model_cfg.num_params():,}; {_describe(layout, cfg)}; raw segment {batches.raw_len} -> "
             f"inputs {dcfg.inputs_length}, targets {batches.targets_length}; {len(batches.segments)} training "
             f"segments ({'short ones packed' if batches.pack else 'short ones dropped'}); unigram baseline "
             f"{unigram_entropy(store.tokens):.3f} nats/token")

    def evaluator(m):
        return loss_eval(m, itertools.islice(held_out, cfg.eval_iters), layout.device, cfg.bf16)

    row = train(model, batches, evaluator, tcfg, ocfg, tokenizer=tok, layout=layout, progress=progress,
                resume=cfg.resume_from())
    return {**row, "final": os.path.join(out, "final")}


def _describe(layout: parallel.Layout, cfg: LoopConfig) -> str:
    if layout.world == 1:
        return "1 process"
    how = {"ddp": "DDP", "fsdp": "FSDP2"}[cfg.parallel]
    return (f"{layout.world} processes: {layout.dp} data-parallel ({how}) x {layout.tp} tensor-parallel"
            + ("; activations recomputed" if cfg.recompute_activations else ""))


def unigram_entropy(tokens) -> float:
    """Entropy (nats) of the corpus' token frequencies: the loss of a model that ignores context."""
    import numpy as np
    p = np.bincount(np.asarray(tokens)).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


# ---- fine-tune ----

EVAL_METRICS = ("loss", "bleu", "chrf", "rouge", "exact_match", "accuracy")
MONITOR = {"loss": "eval_loss", "rouge": "eval_rougeL"}  # others: eval_<metric>


@dataclass
class TaskFields:
    """How task files become (input, target) pairs: the flags `finetune` and `evaluate` share."""
    prefix: str = _help("prefix for inputs of files given without one, e.g. 'translate English to French: '",
                        default="")
    input_field: str = "input"
    target_field: str = "target"
    skip_bad_lines: bool = _help("skip (and count) malformed lines: not UTF-8 or JSON, a field or cell missing",
                                 default=False)

    def source(self, spec: str) -> TaskSource:
        return parse_source(spec, self.prefix, self.input_field, self.target_field, self.skip_bad_lines)


@dataclass
class FinetuneConfig(LoopConfig, TaskFields):
    """Text-to-text fine-tuning on one task or a mixture (T5 paper section 3.5.2)."""
    model: str | None = _help("HF directory, hub id, or a t5kit pretrain / finetune output", default=None)
    train: list[str] = _help("task files (.jsonl .csv .tsv .parquet, a datasets dir, hf:NAME[@SPLIT]), each "
                             "FILE or FILE:PREFIX", default_factory=list)
    valid: str | None = _help("validation file (FILE or FILE:PREFIX)", default=None)
    save: str = "runs/finetune"
    tokenizer: str | None = _help("tokenizer directory (default: the model's)", default=None)
    max_input_length: int = 512
    max_target_length: int = 128
    pack: bool = _help("pack several examples per row (segment ids) instead of length buckets", default=False)
    mixture: str = _help("proportional | temperature", default="proportional")
    mixture_cap: int | None = _help("examples-proportional cap K (T5 paper 3.5.2)", default=None)
    mixture_temperature: float = 1.0
    lr: float = 3e-4
    lr_decay_style: str = "linear"
    label_smoothing: float = 0.0
    dropout: float | None = _help("override the checkpoint's dropout rate", default=None)
    freeze: list[str] = _help(f"parts to keep fixed: {' '.join(FREEZE_PARTS)} (repeatable)", default_factory=list)
    eval_interval: int = 200
    eval_metric: str = _help(f"what picks <save>/best and drives --patience: {' | '.join(EVAL_METRICS)}",
                             default="loss")
    eval_max_examples: int | None = _help("generate for at most this many validation examples", default=None)
    eval_batch_size: int = 32
    eval_num_beams: int = 1
    patience: int = _help("stop after this many evaluations without improvement (0: never)", default=0)


def finetune(cfg: FinetuneConfig, progress: bool = True) -> dict:
    """Fine-tune on text-to-text data; -> the last log row with `best_step`, `best`, and the
    `final` / `best` export paths."""
    if not cfg.model:
        raise ValueError("--model is required: an HF directory, a hub id, or a t5kit pretrain output")
    if not cfg.train:
        raise ValueError("--train is required: one or more task files (FILE or FILE:PREFIX)")
    if cfg.eval_metric not in EVAL_METRICS:
        raise ValueError(f"--eval-metric {cfg.eval_metric!r}: expected one of {', '.join(EVAL_METRICS)}")
    gen_metric = [cfg.eval_metric] if cfg.eval_metric != "loss" else []
    check_metrics(gen_metric)
    for part in cfg.freeze:
        if part not in FREEZE_PARTS:
            raise ValueError(f"--freeze {part!r}: expected one of {', '.join(FREEZE_PARTS)}")
    if gen_metric and cfg.tensor_model_parallel_size > 1:
        raise ValueError(f"--eval-metric {cfg.eval_metric} generates text, which runs on whole layers: use "
                         f"--tensor-model-parallel-size 1 (FSDP / DDP), or --eval-metric loss")
    layout = _setup(cfg)
    rank, world = layout.dp_rank, layout.dp
    model_dir = resolve_model_dir(cfg.model)
    tok = _tokenizer_for(model_dir, cfg.tokenizer)
    cache = os.path.join(cfg.save, "cache")
    lengths = dict(max_input_length=cfg.max_input_length, max_target_length=cfg.max_target_length)
    tasks = [tokenize_task(cfg.source(spec), tok, cache_dir=cache, progress=progress, **lengths)
             for spec in cfg.train]
    for t in tasks:
        _report_task("train", t, cfg)
    valid = valid_texts = None
    if cfg.valid:
        source = cfg.source(cfg.valid)
        valid = tokenize_task(source, tok, cache_dir=cache, **lengths)
        if not valid.inputs:
            raise ValueError(f"{source.path}: empty validation set")
        _report_task("valid", valid, cfg)
        valid_texts = read_examples(source)[:cfg.eval_max_examples]
    elif cfg.eval_metric != "loss" or cfg.patience:
        raise ValueError(f"--eval-metric {cfg.eval_metric} / --patience need a --valid set")
    rates = mixture_rates([len(t.inputs) for t in tasks], cfg.mixture, cfg.mixture_cap, cfg.mixture_temperature)
    if len(tasks) > 1:
        _say("mixture rates: " + ", ".join(f"{t.name} {r:.3f}" for t, r in zip(tasks, rates)))
    batches = TaskBatches(tasks, cfg.micro_batch_size, rates=rates, seed=cfg.seed, pack=cfg.pack,
                          inputs_length=cfg.max_input_length, targets_length=cfg.max_target_length,
                          rank=rank, world=world, pad=tok.pad_id)
    model = _load_model(model_dir, tok)
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    n_frozen = freeze(model, cfg.freeze)
    tcfg, ocfg = cfg.loop(layout, eval_interval=cfg.eval_interval if valid else 0, export_best=valid is not None,
                          label_smoothing=cfg.label_smoothing, patience=cfg.patience,
                          monitor=MONITOR.get(cfg.eval_metric, f"eval_{cfg.eval_metric}"))
    if layout.rank == 0:
        write_run_config(cfg.save, model=model.config.to_hf_json(), train=tcfg, optim=ocfg, flags=asdict(cfg))
        _say(f"{model_dir}: {model.config.num_params():,} parameters ({n_frozen:,} frozen); {_describe(layout, cfg)}")

    def evaluator(m) -> dict:
        shard = itertools.islice(eval_batches(valid, cfg.eval_batch_size), rank, None, world)
        row = loss_eval(m, shard, layout.device, cfg.bf16)
        if gen_metric:
            with parallel.gathered(m):  # generation calls layers outside their forward
                preds = predict(m, tok, [i for i, _ in valid_texts[rank::world]], cfg.eval_batch_size,
                                num_beams=cfg.eval_num_beams, max_new_tokens=cfg.max_target_length,
                                max_input_tokens=cfg.max_input_length)
            shares = parallel.gather(preds)  # rank r generated examples r, r + world, ...
            preds = [shares[i % world][i // world] for i in range(len(valid_texts))]
            scores = compute(gen_metric, preds, [t for _, t in valid_texts])
            row.update({f"eval_{k}": v for k, v in scores.items() if isinstance(v, float)})
        return row

    row = train(model, batches, evaluator if valid else None, tcfg, ocfg, tokenizer=tok, layout=layout,
                progress=progress, resume=cfg.resume_from())
    return {**row, "final": os.path.join(cfg.save, "final"),
            "best_dir": os.path.join(cfg.save, "best") if valid else None}


def _report_task(split: str, t, cfg: FinetuneConfig) -> None:
    msg = f"{split} {t.name}: {len(t.inputs):,} examples"
    if t.n_skipped:
        msg += f"; skipped {t.n_skipped:,} malformed lines (--skip-bad-lines)"
    if t.n_truncated_inputs or t.n_truncated_targets:
        msg += (f"; truncated {t.n_truncated_inputs:,} inputs to --max-input-length {cfg.max_input_length} and "
                f"{t.n_truncated_targets:,} targets to --max-target-length {cfg.max_target_length}")
    _say(msg)


def set_dropout(model, p: float) -> None:
    """Change the dropout rate of a built model (and its config, so exports record it)."""
    import torch
    if not 0.0 <= p < 1.0:
        raise ValueError(f"--dropout {p}: expected a value in [0, 1)")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        elif isinstance(getattr(m, "dropout", None), float):  # attention's SDPA dropout_p
            m.dropout = p
    model.config = model.config.replace(dropout_rate=p)


def predict(model, tok, inputs: list[str], batch_size: int, progress: bool = False, **gen) -> list[str]:
    """Generate one output per input (length-sorted batches, input order kept); an empty input
    gets an empty prediction."""
    from ..inference.generate import generate_texts
    results = generate_texts(model, tok, inputs, batch_size=batch_size, progress=progress, **gen)
    return [r.outputs[0] if r.outputs else "" for r in results]


# ---- evaluate ----

@dataclass
class EvalConfig(TaskFields):
    """Generate for a labelled set and score it."""
    model: str | None = _help("HF directory, hub id, or a t5kit run directory", default=None)
    data: str | None = _help("labelled file (.jsonl .csv .tsv .parquet, ...), FILE or FILE:PREFIX", default=None)
    metric: list[str] = _help("bleu chrf rouge exact_match accuracy", default_factory=lambda: ["bleu", "chrf"])
    predictions: str | None = _help("write {input, target, prediction} per example here (JSONL)", default=None)
    output: str | None = _help("write the scores here (one JSON object)", default=None)
    tokenizer: str | None = None
    num_beams: int = 1
    max_new_tokens: int = 128
    max_input_length: int = 512
    max_examples: int | None = _help("score only the first N examples", default=None)
    batch_size: int = 32
    device: str = "cpu"
    dtype: str = "fp32"


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    """-> {metric: score, ..., "n_examples": n[, "sacrebleu_signature": ...]}, also written to
    cfg.output; predictions to cfg.predictions."""
    from ..atomic import write_json, write_text
    from ..inference.cpu import for_inference
    from ..model.hf import from_pretrained, resolve_dtype
    from ..model.t5 import T5

    if not cfg.model or not cfg.data:
        raise ValueError("--model and --data are required")
    check_metrics(cfg.metric)
    source, stats = cfg.source(cfg.data), {}
    examples = read_examples(source, stats)[:cfg.max_examples]
    if stats["skipped"]:
        _say(f"{source.path}: skipped {stats['skipped']:,} malformed lines (--skip-bad-lines)")
    if not examples:
        raise ValueError(f"{source.path}: no examples to evaluate")
    model_dir = resolve_model_dir(cfg.model)
    tok = _tokenizer_for(model_dir, cfg.tokenizer)
    model = for_inference(from_pretrained(T5, model_dir, dtype=resolve_dtype(cfg.dtype), device=cfg.device))
    tok.check_model_vocab(model.config.vocab_size, f"{model_dir}/config.json")
    preds = predict(model, tok, [i for i, _ in examples], cfg.batch_size, progress=progress,
                    num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens, max_input_tokens=cfg.max_input_length)
    scores = compute(cfg.metric, preds, [t for _, t in examples])
    result = {**scores, "n_examples": len(examples)}
    if cfg.predictions:
        write_text(cfg.predictions, "".join(json.dumps({"input": i, "target": t, "prediction": p}, ensure_ascii=False)
                                            + "\n" for (i, t), p in zip(examples, preds)))
    if cfg.output:
        write_json(cfg.output, result)
    return result


# ---- embed ----

POOLS = ("mean", "none")


@dataclass
class EmbedConfig:
    """Encode one text per line with a T5 encoder; write the vectors (or hidden states) as safetensors."""
    model: str | None = _help("encoder-only (T5EncoderModel) or full T5 checkpoint: directory or hub id",
                              default=None)
    input: str | None = _help("UTF-8 text file, one text per line (an empty line is an error)", default=None)
    output: str | None = _help("safetensors file to write (atomically); rows in input order", default=None)
    pool: str = _help("mean: tensor 'embeddings' (N, C), each line's mean over its tokens, padding excluded "
                      "(sentence-transformers' mean pooling). none: 'hidden_states' (N, S_max, C), zero past each "
                      "line's end, and 'attention_mask' (N, S_max), 1 = token", default="mean")
    tokenizer: str | None = _help("tokenizer directory (default: the model's)", default=None)
    batch_size: int = 32
    max_length: int = _help("longer lines keep their first max_length - 1 tokens and EOS (counted and reported)",
                            default=512)
    device: str = "cpu"
    dtype: str = _help("fp32 | bf16 | fp16, also the dtype of the tensors written", default="fp32")


def read_lines(path: str) -> list[str]:
    """The texts of `path`, one per line, line endings removed. A line that is not UTF-8 or is
    empty (or blank) is an error naming the file and line: it would silently embed EOS alone."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: input file not found")
    texts = []
    for n, line in enumerate(utf8_lines(path), 1):
        if isinstance(line, BadLine):
            raise line
        text = line.rstrip("\r\n")
        if not text.strip():
            raise ValueError(f"{path}: line {n} is empty: expected one text per line")
        texts.append(text)
    if not texts:
        raise ValueError(f"{path}: no lines to embed")
    return texts


def embed(cfg: EmbedConfig, progress: bool = True) -> dict:
    """Encode each line of cfg.input with the checkpoint's encoder (T5Encoder: a full checkpoint's
    decoder is never loaded) and write cfg.output. Lines are batched longest first (little
    padding; an out-of-memory shows in the first batch) and written back in input order.
    -> {output, lines, dim, pool, tokens, truncated, seconds, tokens_per_s}."""
    import time

    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from ..atomic import atomic_path
    from ..model.hf import from_pretrained, resolve_dtype
    from ..model.t5 import T5Encoder, mean_pool

    if not cfg.model or not cfg.input or not cfg.output:
        raise ValueError("--model, --input and --output are required")
    if cfg.pool not in POOLS:
        raise ValueError(f"--pool {cfg.pool!r}: expected one of {', '.join(POOLS)}")
    if cfg.batch_size < 1 or cfg.max_length < 1:
        raise ValueError(f"--batch-size {cfg.batch_size} / --max-length {cfg.max_length}: expected positive integers")
    texts = read_lines(cfg.input)  # before the model loads: a bad line fails in a second
    model_dir = resolve_model_dir(cfg.model)
    tok = _tokenizer_for(model_dir, cfg.tokenizer)
    model = from_pretrained(T5Encoder, model_dir, dtype=resolve_dtype(cfg.dtype), device=cfg.device)
    tok.check_model_vocab(model.config.vocab_size, f"{model_dir}/config.json")
    rows = [tok.encode(t) for t in texts]
    truncated = sum(len(r) > cfg.max_length for r in rows)
    if truncated:
        _say(f"{cfg.input}: truncated {truncated:,} of {len(rows):,} lines to --max-length {cfg.max_length} tokens")
    rows = [r if len(r) <= cfg.max_length else r[:cfg.max_length - 1] + [tok.eos_id] for r in rows]
    n, c, width = len(rows), model.config.d_model, max(map(len, rows))
    dtype = model.shared.weight.dtype
    if cfg.pool == "mean":
        out = {"embeddings": torch.zeros(n, c, dtype=dtype)}
    else:
        out = {"hidden_states": torch.zeros(n, width, c, dtype=dtype),
               "attention_mask": torch.zeros(n, width, dtype=torch.long)}
    order = sorted(range(n), key=lambda i: -len(rows[i]))
    bar = tqdm(total=n, disable=not progress, unit="line", desc="embed")
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, n, cfg.batch_size):
            idx = torch.tensor(order[start:start + cfg.batch_size])
            lengths = torch.tensor([len(rows[i]) for i in idx.tolist()])
            s = int(lengths.max())
            ids = torch.tensor([rows[i] + [tok.pad_id] * (s - len(rows[i])) for i in idx.tolist()])  # (b, s)
            mask = (torch.arange(s)[None] < lengths[:, None]).long()  # (b, s)
            hidden = model(ids.to(cfg.device), mask.to(cfg.device))  # (b, s, C)
            if cfg.pool == "mean":
                out["embeddings"][idx] = mean_pool(hidden, mask.to(cfg.device)).cpu()
            else:  # padding positions zeroed: the file does not depend on how lines were batched
                out["hidden_states"][idx, :s] = (hidden * mask.to(cfg.device)[:, :, None]).cpu()
                out["attention_mask"][idx, :s] = mask
            bar.update(len(idx))
    seconds = time.perf_counter() - t0
    bar.close()
    with atomic_path(cfg.output) as tmp:
        save_file(out, tmp, metadata={"model": cfg.model, "pool": cfg.pool, "max_length": str(cfg.max_length)})
    tokens = sum(map(len, rows))
    return {"output": cfg.output, "lines": n, "dim": c, "pool": cfg.pool, "tokens": tokens, "truncated": truncated,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}

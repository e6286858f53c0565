"""`t5kit finetune`: text-to-text fine-tuning on one task or a mixture (T5 paper section 3.5.2),
validated by loss or a generation metric; writes <save>/best and <save>/final in the HF layout,
or with --lora-rank, LoRA adapters on a frozen base, as peft writes them (model/lora.py).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, replace
from functools import partial

from ..data.readers import TaskSource, read_examples
from ..data.task_cache import tokenize_task
from ..data.tasks import TaskBatches, eval_batches, mixture_rates
from ..model.hf import save_pretrained
from ..model.lora import LoraConfig, add_lora, parse_targets, resolved_targets, save_adapter
from ..options import option
from ..training import parallel
from ..training.loop import FREEZE_PARTS, freeze, train, write_run_config
from ..training.loop import evaluate as loss_eval
from .common import LoopConfig, TaskFields, describe, load_model, predict, resolve_model_dir, say, setup, tokenizer_for
from .metrics import check_metrics, compute

EVAL_METRICS = ("loss", "bleu", "chrf", "rouge", "exact_match", "accuracy")
MONITOR = {"loss": "eval_loss", "rouge": "eval_rougeL"}  # others: eval_<metric>


@dataclass
class FinetuneConfig(LoopConfig, TaskFields):
    """Text-to-text fine-tuning on one task or a mixture (T5 paper section 3.5.2)."""
    model: str | None = option("HF directory, hub id, or a t5kit pretrain / finetune output", default=None)
    train: list[str] = option("task files (.jsonl .csv .tsv .parquet, a datasets dir, hf:NAME[@SPLIT]), each "
                              "FILE or FILE:PREFIX", default_factory=list)
    valid: str | None = option("validation file (FILE or FILE:PREFIX)", default=None)
    save: str = "runs/finetune"
    tokenizer: str | None = option("tokenizer directory (default: the model's)", default=None)
    max_input_length: int = 512
    max_target_length: int = 128
    pack: bool = option("pack several examples per row (segment ids) instead of length buckets", default=False)
    mixture: str = option("proportional | temperature", default="proportional")
    mixture_cap: int | None = option("examples-proportional cap K (T5 paper 3.5.2)", default=None)
    mixture_temperature: float = 1.0
    lr: float = 3e-4
    lr_decay_style: str = "linear"
    label_smoothing: float = 0.0
    dropout: float | None = option("override the checkpoint's dropout rate", default=None)
    freeze: list[str] = option(f"parts to keep fixed: {' '.join(FREEZE_PARTS)} (repeatable)", default_factory=list)
    eval_interval: int = 200
    eval_metric: str = option(f"what picks <save>/best and drives --patience: {' | '.join(EVAL_METRICS)}",
                              default="loss")
    eval_max_examples: int | None = option("generate for at most this many validation examples", default=None)
    eval_batch_size: int = 32
    eval_num_beams: int = 1
    patience: int = option("stop after this many evaluations without improvement (0: never)", default=0)
    lora_rank: int | None = option("LoRA: train rank-R adapters on --lora-targets, every base weight frozen; "
                                   "<save>/best and final hold the adapter in peft's format (default: full "
                                   "fine-tuning)", default=None)
    lora_alpha: float | None = option("LoRA: updates are scaled by alpha / rank (default: 2 x rank)", default=None)
    lora_dropout: float = option("LoRA: dropout on the adapters' input", default=0.0)
    lora_targets: str = option("LoRA: comma-separated modules as transformers and peft name them, "
                               "q,k,v,o,wi,wi_0,wi_1,wo (q, k, v, o in self- and cross-attention), or all-linear "
                               "(every projection but the LM head)", default="q,v")


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
    lora = lora_config(cfg)
    if gen_metric and cfg.tensor_model_parallel_size > 1:
        raise ValueError(f"--eval-metric {cfg.eval_metric} generates text, which runs on whole layers: use "
                         f"--tensor-model-parallel-size 1 (FSDP / DDP), or --eval-metric loss")
    layout = setup(cfg)
    rank, world = layout.dp_rank, layout.dp
    model_dir = resolve_model_dir(cfg.model)
    tok = tokenizer_for(model_dir, cfg.tokenizer)
    cache = os.path.join(cfg.save, "cache")
    lengths = dict(max_input_length=cfg.max_input_length, max_target_length=cfg.max_target_length)
    tasks = [tokenize_task(source, tok, cache_dir=cache, progress=progress, **lengths)
             for source in unique_names([cfg.source(spec) for spec in cfg.train])]
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
        say("mixture rates: " + ", ".join(f"{t.name} {r:.3f}" for t, r in zip(tasks, rates)))
    batches = TaskBatches(tasks, cfg.micro_batch_size, rates=rates, seed=cfg.seed, pack=cfg.pack,
                          inputs_length=cfg.max_input_length, targets_length=cfg.max_target_length,
                          rank=rank, world=world, pad=tok.pad_id)
    model = load_model(model_dir, tok)
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    n_frozen, save = freeze(model, cfg.freeze), save_pretrained
    if lora:
        lora = with_adapters(model, lora, model_dir, cfg.seed)
        save = partial(save_adapter, cfg=lora)
    tcfg, ocfg = cfg.loop(layout, eval_interval=cfg.eval_interval if valid else 0, export_best=valid is not None,
                          label_smoothing=cfg.label_smoothing, patience=cfg.patience,
                          monitor=MONITOR.get(cfg.eval_metric, f"eval_{cfg.eval_metric}"),
                          checkpoint_frozen=lora is None)
    if layout.rank == 0:
        write_run_config(cfg.save, model=model.config.to_hf_json(), train=tcfg, optim=ocfg, flags=asdict(cfg))
        what = (f"LoRA rank {lora.r} on {','.join(lora.targets)}: {model.config.num_params():,} parameters frozen, "
                f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trained" if lora else
                f"{model.config.num_params():,} parameters ({n_frozen:,} frozen)")
        say(f"{model_dir}: {what}; {describe(layout, cfg)}")

    def evaluator(m) -> dict:
        # every rank is given the whole set and runs its share, padded to the same number of forwards
        row = loss_eval(m, eval_batches(valid, cfg.eval_batch_size), layout.device, cfg.bf16, rank, world)
        if gen_metric:
            with parallel.gathered(m):  # generation calls layers outside their forward
                preds, cut = predict(m, tok, [i for i, _ in valid_texts[rank::world]], cfg.eval_batch_size,
                                     num_beams=cfg.eval_num_beams, max_new_tokens=cfg.max_target_length,
                                     max_input_tokens=cfg.max_input_length)
            (cut,) = parallel.sum_all(cut)
            if cut:
                say(f"validation by generation: truncated {int(cut):,} inputs to --max-input-length "
                    f"{cfg.max_input_length}")
            shares = parallel.gather(preds)  # rank r generated examples r, r + world, ...
            preds = [shares[i % world][i // world] for i in range(len(valid_texts))]
            scores = compute(gen_metric, preds, [t for _, t in valid_texts])
            row.update({f"eval_{k}": v for k, v in scores.items() if isinstance(v, float)})
        return row

    row = train(model, batches, evaluator if valid else None, tcfg, ocfg, tokenizer=tok, layout=layout,
                progress=progress, resume=cfg.resume_from(), save=save)
    return {**row, "final": os.path.join(cfg.save, "final"),
            "best_dir": os.path.join(cfg.save, "best") if valid else None}


def lora_config(cfg: FinetuneConfig) -> LoraConfig | None:
    """The run's LoRA settings from its --lora-* flags, checked before any work; None without
    --lora-rank."""
    if cfg.lora_rank is None:
        return None
    if cfg.freeze:
        raise ValueError("--freeze with --lora-rank: LoRA freezes every base weight already")
    if cfg.tensor_model_parallel_size > 1:
        raise ValueError("--lora-rank with --tensor-model-parallel-size > 1 is not supported: use FSDP "
                         "(--parallel fsdp) or DDP")
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_rank
    return LoraConfig(cfg.lora_rank, alpha, cfg.lora_dropout, parse_targets(cfg.lora_targets))


def with_adapters(model, lora: LoraConfig, model_dir: str, seed: int) -> LoraConfig:
    """Freeze every weight of `model` and add trainable adapters (A drawn from `seed`, B zero: the
    model starts as the base). -> `lora` with its targets resolved (all-linear expanded, as peft
    writes target_modules) and the base it adapts."""
    import torch
    model.requires_grad_(False)
    names = add_lora(model, lora, torch.Generator().manual_seed(seed))
    base = os.path.abspath(model_dir) if os.path.isdir(model_dir) else model_dir  # a hub id stays one
    return replace(lora, targets=resolved_targets(names), base_model=base)


def unique_names(sources: list[TaskSource]) -> list[TaskSource]:
    """Tasks are named by file stem in logs and cache files; files of one stem in several folders
    (en_fr/train.jsonl, fr_en/train.jsonl) are named folder/stem instead.

    >>> [s.name for s in unique_names([TaskSource("a/train.jsonl"), TaskSource("b/train.jsonl"), TaskSource("c.csv")])]
    ['a/train', 'b/train', 'c']
    """
    stems = Counter(s.name for s in sources)
    return [replace(s, name=f"{os.path.basename(os.path.dirname(os.path.abspath(s.path)))}/{s.name}")
            if stems[s.name] > 1 and not s.path.startswith("hf:") else s for s in sources]


def _report_task(split: str, t, cfg: FinetuneConfig) -> None:
    msg = f"{split} {t.name}: {len(t.inputs):,} examples"
    if t.n_skipped:
        msg += f"; skipped {t.n_skipped:,} malformed lines (--skip-bad-lines)"
    if t.n_truncated_inputs or t.n_truncated_targets:
        msg += (f"; truncated {t.n_truncated_inputs:,} inputs to --max-input-length {cfg.max_input_length} and "
                f"{t.n_truncated_targets:,} targets to --max-target-length {cfg.max_target_length}")
    say(msg)


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

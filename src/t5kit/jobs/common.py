"""What every job shares: the run directory and process group (`setup`), the tokenizer and model
of a checkpoint or run directory (`tokenizer_for`, `resolve_model_dir`, `load_model`), the
training-loop flags of `pretrain` and `finetune` (`LoopConfig`, Megatron-LM's names and meaning),
the task flags of `finetune` and `evaluate` (`TaskFields`), and batched prediction (`predict`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from ..data.readers import TaskSource, parse_source
from ..data.tokenizer import Tokenizer
from ..options import option
from ..training import checkpoint, parallel
from ..training.loop import TrainConfig
from ..training.optim import OptimConfig


def say(msg: str) -> None:
    """A progress line on stderr, from the main process only; above a running progress bar, not
    inside it (`tqdm.write`)."""
    from tqdm import tqdm
    if parallel.is_main():
        tqdm.write(f"t5kit: {msg}", file=sys.stderr)


# ---- shared preparation ----


def resolve_model_dir(spec: str) -> str:
    """An HF directory, a hub id, or a `t5kit pretrain` / `finetune` output: the run directory
    itself means its `final` export."""
    if os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, "config.json")) \
            and os.path.isfile(os.path.join(spec, "final", "config.json")):
        return os.path.join(spec, "final")
    return spec


def tokenizer_for(model_dir: str | None, tokenizer: str | None, tokenizer_type: str | None = None,
                  tokenizer_model: str | None = None, vocab_file: str | None = None,
                  vocab_extra_ids: int = 100) -> Tokenizer:
    """The job's tokenizer: Megatron-LM's --tokenizer-type with --tokenizer-model / --vocab-file /
    --vocab-extra-ids (`Tokenizer.from_megatron`), else the --tokenizer directory, else the model's."""
    if tokenizer_type or tokenizer_model or vocab_file:
        if tokenizer:
            raise ValueError(f"--tokenizer {tokenizer} and --tokenizer-type / --tokenizer-model / --vocab-file: "
                             "give one tokenizer")
        return Tokenizer.from_megatron(tokenizer_type, tokenizer_model, vocab_file, vocab_extra_ids)
    where = tokenizer or model_dir
    try:
        return Tokenizer.from_pretrained(where)
    except FileNotFoundError as e:
        if tokenizer is None and "no tokenizer found" in str(e):
            raise FileNotFoundError(f"{e}; pass --tokenizer DIR") from None
        raise


def setup(cfg: "LoopConfig") -> parallel.Layout:
    """The process group and mesh of a training job (a bad layout stops every rank alike)."""
    layout = parallel.init(cfg.device, cfg.tensor_model_parallel_size)
    if cfg.save and layout.rank == 0:
        os.makedirs(cfg.save, exist_ok=True)
    return layout


def load_model(model_dir: str, tok: Tokenizer):
    from ..model.hf import from_pretrained
    from ..model.t5 import T5
    model = from_pretrained(T5, model_dir)
    tok.check_model_vocab(model.config.vocab_size, f"{model_dir}/config.json")
    return model


def describe(layout: parallel.Layout, cfg: LoopConfig) -> str:
    if layout.world == 1:
        return "1 process"
    how = {"ddp": "DDP", "fsdp": "FSDP2"}[cfg.parallel]
    return (f"{layout.world} processes: {layout.dp} data-parallel ({how}) x {layout.tp} tensor-parallel"
            + ("; activations recomputed" if cfg.recompute_activations else ""))


@dataclass
class LoopConfig:
    """The training-loop flags `pretrain` and `finetune` share (Megatron-LM's names and meaning)."""
    save: str = "runs/t5kit"
    load: str | None = option("resume from the latest checkpoint of this --save directory (or a checkpoints "
                              "folder or one step_* checkpoint); with none there yet, start fresh", default=None)
    resume: bool = option("shorthand for --load with the --save directory", default=False)
    finetune: bool = option("with --load: load the weights only (optimizer, step, data and RNG start fresh)",
                            default=False)
    no_load_optim: bool = option("with --load: do not restore the optimizer state", default=False)
    no_load_rng: bool = option("with --load: do not restore the RNG states", default=False)
    exit_interval: int = option("save a checkpoint and exit cleanly after this many steps (a restart with the "
                                "same command continues)", default=0)
    exit_duration_in_mins: float = option("save a checkpoint and exit cleanly after this many minutes of training",
                                          default=0.0)
    tensorboard_dir: str | None = option("write TensorBoard scalars here", default=None)
    parallel: str = option("how data-parallel ranks hold the model under torchrun: ddp (whole replicas) | fsdp "
                           "(FSDP2: parameters, gradients and optimizer state sharded)", default="ddp")
    tensor_model_parallel_size: int = option("split every layer over this many ranks (Megatron's layout); "
                                             "the data-parallel size is the world size over it", default=1)
    recompute_activations: bool = option("activation checkpointing per block: recompute in backward instead "
                                         "of keeping activations", default=False)
    compile: str = option("torch.compile the training step: none | block (each encoder and decoder block, "
                          "torchtitan's way) | model (the whole forward in one graph; not with --parallel fsdp); "
                          "the first step's time, compilation included, is logged as first_step_s",
                          default="none")
    micro_batch_size: int = 8
    global_batch_size: int | None = option("micro batch x accumulation x data-parallel ranks (default: no "
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
    bf16_params: bool = option("with --bf16: keep the weights in bf16 (cast once per step) and fp32 master weights "
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
            say(f"{where}: no checkpoint (step_*) yet: starting fresh")
        return found


@dataclass
class TaskFields:
    """How task files become (input, target) pairs: the flags `finetune` and `evaluate` share."""
    prefix: str = option("prefix for inputs of files given without one, e.g. 'translate English to French: '",
                         default="")
    input_field: str = "input"
    target_field: str = "target"
    skip_bad_lines: bool = option("skip (and count) malformed lines: not UTF-8 or JSON, a field or cell missing",
                                  default=False)

    def source(self, spec: str) -> TaskSource:
        return parse_source(spec, self.prefix, self.input_field, self.target_field, self.skip_bad_lines)


def predict(model, tok, inputs: list[str], batch_size: int, progress: bool = False,
            **gen) -> tuple[list[str], int]:
    """Generate one output per input (length-sorted batches, input order kept); an empty input
    gets an empty prediction. -> (predictions, how many inputs were truncated to `max_input_tokens`:
    their first max_input_tokens - 1 tokens and EOS), the count for the caller to report once."""
    from ..inference.generate import generate_texts
    truncated: list[str] = []  # generate_texts' warning per truncated prompt
    results = generate_texts(model, tok, inputs, batch_size=batch_size, progress=progress, warn=truncated.append,
                             **gen)
    return [r.outputs[0] if r.outputs else "" for r in results], len(truncated)

"""One training loop for pretraining and fine-tuning.

bf16 autocast over fp32 master weights; gradient accumulation with the loss normalised by the
number of target tokens in the whole global batch (torchtitan `train.py`); clipping; optional
z-loss and label smoothing; periodic evaluation through a callback (loss, token accuracy, or a
generation metric), with the best evaluation exported to <out>/best and early stopping after
`patience` evaluations without improvement; a tqdm bar; metrics.jsonl (and TensorBoard when
installed); atomic checkpoints with exact resume; final weights + tokenizer in <out>/final.

The step without waste: `--compile block|model` (parallel.compile_model; RMSNorm, the gated GELU
and residual adds fuse under inductor), the cross-entropy read in fp32 a chunk of rows at a time
(`loss.TokenStats`), weights cast to bf16 once per step with `--bf16-params` (optim.fp32_masters; under
plain --bf16, autocast's weight cache casts each weight once per micro-batch forward), and no host
sync in the step: token counts come from the host arrays, the loss and gradient norm stay on the
device until a logged step reads them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..data.tasks import rank_share, resume_state
from ..model.hf import save_pretrained
from . import checkpoint, parallel
from .loss import loss_terms
from .optim import OptimConfig, build_optimizer, fp32_masters, lr_at


@dataclass(frozen=True)
class TrainConfig:
    out: str = "runs/t5kit"
    steps: int = 1000
    micro_batch: int = 8
    global_batch: int = 8
    clip_grad: float = 1.0
    z_loss: float = 0.0
    bf16: bool = False
    eval_interval: int = 100
    save_interval: int = 500
    keep_checkpoints: int = 3
    log_interval: int = 10
    seed: int = 1234
    data_parallel: int = 1  # data-parallel ranks (the world size over the tensor-parallel size)
    parallel: str = "ddp"  # how data-parallel ranks hold the model: ddp (replicas) | fsdp (FSDP2 shards)
    recompute: bool = False  # activation checkpointing per block
    compile: str = "none"  # torch.compile: none | block (each block and final norm) | model (the whole forward)
    bf16_params: bool = False  # bf16 weights, fp32 master copies and state in the optimizer (needs bf16)
    label_smoothing: float = 0.0
    monitor: str = "eval_loss"  # the evaluation key that picks <out>/best and drives early stopping
    patience: int = 0  # stop after this many evaluations without improvement (0: never)
    export_best: bool = False
    # Megatron's checkpoint habits: how a checkpoint given to train(resume=...) is loaded, and
    # when a preemptible job saves and exits before train_iters (0: never).
    finetune: bool = False  # weights only: optimizer, step, data and RNG start fresh
    load_optim: bool = True
    load_rng: bool = True
    exit_interval: int = 0
    exit_duration_mins: float = 0.0
    tensorboard_dir: str | None = None
    # False: checkpoints hold the trainable parameters (and their optimizer state) only; the frozen
    # ones come again from the model given at resume (LoRA: adapters of a few MiB, not the base)
    checkpoint_frozen: bool = True

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label smoothing {self.label_smoothing}: expected a value in [0, 1)")
        if self.patience < 0:
            raise ValueError(f"patience {self.patience}: expected >= 0")
        if self.global_batch % (self.micro_batch * self.data_parallel):
            raise ValueError(f"--global-batch-size {self.global_batch} is not divisible by --micro-batch-size "
                             f"{self.micro_batch} x {self.data_parallel} data-parallel ranks (the world size over "
                             f"--tensor-model-parallel-size)")
        if self.parallel not in parallel.PARALLEL:
            raise ValueError(f"--parallel {self.parallel!r}: expected one of {', '.join(parallel.PARALLEL)}")
        if self.compile not in parallel.COMPILE:
            raise ValueError(f"--compile {self.compile!r}: expected one of {', '.join(parallel.COMPILE)}")
        if self.bf16_params and not self.bf16:
            raise ValueError("--bf16-params needs --bf16 (autocast keeps softmax and norms in fp32)")
        if self.bf16_params and self.parallel == "fsdp":
            raise ValueError("--bf16-params with --parallel fsdp: FSDP2 under --bf16 already computes with bf16 "
                             "parameters gathered from fp32 shards; drop --bf16-params")

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro_batch * self.data_parallel)

    def improved(self, value: float, best: float | None) -> bool:
        """Losses improve downwards, every other metric (BLEU, accuracy, ...) upwards."""
        if best is None:
            return True
        return value < best if self.monitor.endswith("loss") else value > best


FREEZE_PARTS = ("encoder", "decoder", "embeddings")


def freeze(model: torch.nn.Module, parts) -> int:
    """Stop gradients to parts of the model; they are left out of the optimizer, so they stay bit
    for bit. encoder: encoder.*; decoder: decoder.* and an untied lm_head; embeddings: the shared
    token table (which is also the output layer of a tied model). -> number of frozen parameters."""
    prefixes = {"encoder": ("encoder.",), "decoder": ("decoder.", "lm_head."), "embeddings": ("shared.",)}
    for part in parts:
        if part not in prefixes:
            raise ValueError(f"--freeze {part!r}: expected one of {', '.join(FREEZE_PARTS)}")
    n = 0
    for name, p in model.named_parameters():
        if any(name.startswith(pre) for part in parts for pre in prefixes[part]):
            p.requires_grad_(False)
            n += p.numel()
    return n


def _tensors(batch: dict, device) -> dict:
    return {k: _to_device(v, device) for k, v in batch.items()}


def _to_device(array, device) -> torch.Tensor:
    """An array as a tensor on `device`. To CUDA through pinned memory without blocking: a copy
    from pageable memory waits for the device to finish its queue (a host sync per step)."""
    if torch.device(device).type != "cuda":
        return torch.as_tensor(array, device=device)
    return torch.as_tensor(array).pin_memory().to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model, batches, device, bf16: bool, rank: int = 0, world: int = 1) -> dict:
    """Loss and token accuracy over an evaluation set, summed over the data-parallel ranks.
    `batches` is the whole set (a finite iterable), in the same order on every rank; data-parallel
    rank `rank` of `world` runs its share, padded so that every rank runs the same number of
    forwards (`tasks.rank_share`: under FSDP a rank with one forward more would wait forever)."""
    model.eval()
    total, tokens, correct = 0.0, 0, 0
    for batch in rank_share(batches, rank, world):
        with _autocast(device, bf16), parallel.vocab_parallel():
            loss, n, c = loss_terms(model, _tensors(batch, device))
        total, tokens, correct = total + loss.item(), tokens + n.item(), correct + c.item()
    total, tokens, correct = parallel.sum_all(total, tokens, correct)
    model.train()
    return {"eval_loss": total / max(tokens, 1), "eval_accuracy": correct / max(tokens, 1)}


class HeldOut:
    """An evaluator over fixed batches: the same evaluation set at every evaluation, so that two
    evaluations of an unchanged model report the same loss (issue 17). `batches` is the whole set,
    alike on every rank (`evaluate` splits it over the data-parallel ranks). `train` keeps it in
    checkpoints through `state()` / `load_state()`: a resumed run evaluates on the batches the run
    began with, whatever its number of ranks or micro-batch size."""

    def __init__(self, batches: list[dict], layout: parallel.Layout, bf16: bool):
        self.batches, self.layout, self.bf16 = batches, layout, bf16

    def __call__(self, model) -> dict:
        return evaluate(model, self.batches, self.layout.device, self.bf16, self.layout.dp_rank, self.layout.dp)

    def state(self) -> list[dict]:
        return self.batches

    def load_state(self, batches: list[dict]) -> None:
        self.batches = batches


def _autocast(device, bf16: bool):
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


class MetricsLog:
    """<out>/metrics.jsonl, and TensorBoard scalars in `tensorboard_dir` when one is given."""

    def __init__(self, out: str, tensorboard_dir: str | None):
        self.path = os.path.join(out, "metrics.jsonl")
        self.tb = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard-dir needs the tensorboard package (pip install tensorboard)") from None
            self.tb = SummaryWriter(tensorboard_dir)

    def write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, row["step"])


def train(model, batches, evaluator, tcfg: TrainConfig, ocfg: OptimConfig, tokenizer=None,
          resume: str | None = None, layout: parallel.Layout = parallel.Layout(), progress: bool = True,
          save=save_pretrained) -> dict:
    """Train `model` on `batches` (an iterator with state()/load_state()); returns the last log row.
    save(model, folder) writes the <out>/final and <out>/best exports (LoRA: the adapter alone).

    The model is parallelised here for `layout` (parallel.apply: tensor parallelism, activation
    checkpointing, FSDP2 or DDP), on every rank; `batches` are this data-parallel rank's.
    evaluator(model) -> {"eval_loss": ..., ...} runs every `eval_interval` steps and at the end, on
    every rank (it reduces over ranks itself); `tcfg.monitor` names the key that picks <out>/best.
    An evaluator with `state()` / `load_state()` (`HeldOut`) has its evaluation set kept in the
    checkpoints and restored on resume."""
    from tqdm import tqdm

    device = layout.device
    os.makedirs(tcfg.out, exist_ok=True)
    model.train()  # moved to the device by parallel.apply, after sharding
    if tcfg.bf16_params:
        if layout.tp > 1:
            raise ValueError("--bf16-params with --tensor-model-parallel-size > 1 is not supported; use --bf16")
        model.to(torch.bfloat16)
    torch.manual_seed(tcfg.seed)  # a model built on the meta device is initialised by apply, from this seed
    net = parallel.apply(model, layout, tcfg.parallel, tcfg.bf16, tcfg.recompute, tcfg.compile)
    # dropout masks: reproducible, distinct per data-parallel rank, equal within a tensor-parallel
    # group (whose replicated activations must stay equal)
    torch.manual_seed(tcfg.seed + layout.dp_rank)
    optimizer = build_optimizer(model, ocfg)
    if tcfg.bf16_params:
        fp32_masters(optimizer)
    ckpt_dir = os.path.join(tcfg.out, "checkpoints")
    step, trainer = 0, {"best": None, "best_step": None, "bad_evals": 0}
    main = parallel.is_main()
    if resume:
        step, data_states, saved, eval_state = checkpoint.load(resume, model, optimizer, tcfg.load_optim,
                                                               tcfg.load_rng, weights_only=tcfg.finetune,
                                                               frozen=tcfg.checkpoint_frozen)
        if eval_state is not None and hasattr(evaluator, "load_state"):
            evaluator.load_state(eval_state)
        if not tcfg.finetune:
            state, skipped, skipped_tokens = resume_state(batches, data_states, layout.dp_rank)
            if skipped and main:
                print(f"t5kit: {resume}: saved by {len(data_states)} data-parallel ranks, resumed on "
                      f"{layout.dp}: the data stream continues after the furthest rank, skipping {skipped} "
                      f"examples ({skipped_tokens:,} tokens)", file=sys.stderr)
            batches.load_state(state)
            trainer.update(saved)
    log = MetricsLog(tcfg.out, tcfg.tensorboard_dir) if main else None
    layout_info = {"world": layout.world, "tensor_parallel": layout.tp, "data_parallel": layout.dp,
                   "parallel": tcfg.parallel}
    started = time.monotonic()
    bar = tqdm(total=tcfg.steps, initial=step, disable=not (progress and main), desc="train", unit="step")
    row: dict = {}
    t_last, tokens_since, start, first_step_s = time.perf_counter(), 0, step, None
    while step < tcfg.steps:
        lr = lr_at(step, ocfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        arrays = [next(batches) for _ in range(tcfg.accumulation)]
        # counted on the host, before the copy: no device sync
        local_tokens = sum(int((np.asarray(b["labels"]) != -100).sum()) for b in arrays)
        # target tokens in the whole global batch, summed on the device: read only when logging
        n_tokens = parallel.reduce_sum(_to_device(np.float64(local_tokens), device))
        scale = tcfg.data_parallel / n_tokens.float()  # fp32, as the loss
        micro = [_tensors(b, device) for b in arrays]
        # the loss sum stays on the device until a row is logged (float64, as the Python sum of
        # per-micro-batch values it replaces)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i, b in enumerate(micro):
            with parallel.sync_gradients(net, i == len(micro) - 1), _autocast(device, tcfg.bf16), \
                    parallel.vocab_parallel():
                loss, _, _ = loss_terms(net, b, tcfg.z_loss, tcfg.label_smoothing)
                # DDP / FSDP average gradients over data-parallel ranks: scaling by their number
                # makes it the global token sum
                (loss * scale).backward()
            total += loss.detach()
        grad_norm = parallel.clip_grad_norm([p for p in model.parameters() if p.requires_grad],
                                            tcfg.clip_grad or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_since += sum(b["input_ids"].numel() + b["labels"].numel() for b in micro)
        if step == start + 1:  # compilation happens here under --compile: its cost, reported once
            first_step_s = _synced_seconds(device, t_last)
        row = {"step": step, "loss": total, "lr": lr, "grad_norm": grad_norm}
        stop = False
        if evaluator is not None and tcfg.eval_interval and (step % tcfg.eval_interval == 0 or step == tcfg.steps):
            with torch.compiler.set_stance("force_eager"):  # compiled for the training step, not for evaluation
                row.update(evaluator(model))
            if tcfg.monitor not in row:
                raise ValueError(f"monitored metric {tcfg.monitor!r} is not among the evaluation's keys "
                                 f"{sorted(k for k in row if k.startswith('eval_'))}")
            if tcfg.improved(row[tcfg.monitor], trainer["best"]):
                trainer.update(best=row[tcfg.monitor], best_step=step, bad_evals=0)
                if tcfg.export_best:
                    export(model, tokenizer, os.path.join(tcfg.out, "best"),
                           {"step": step, "monitor": tcfg.monitor, "value": row[tcfg.monitor]}, save)
            else:
                trainer["bad_evals"] += 1
                stop = bool(tcfg.patience) and trainer["bad_evals"] >= tcfg.patience
                if stop:
                    row["early_stop"] = f"no {tcfg.monitor} improvement in {tcfg.patience} evaluations"
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                   if k.startswith("eval_") and isinstance(v, float)))
        leave = _exit_reason(tcfg, step, started)
        if leave:
            row["exit"] = leave
        if step % tcfg.log_interval == 0 or step == tcfg.steps or "eval_loss" in row or stop or leave:
            # the one host sync of a step, on logged steps only
            (loss_sum,) = parallel.sum_all(row["loss"].item())
            row.update(loss=loss_sum / n_tokens.item(), grad_norm=row["grad_norm"].item())
            if first_step_s is not None:
                row["first_step_s"], first_step_s = first_step_s, None
            now = time.perf_counter()
            row["tokens_per_s"] = tokens_since / (now - t_last) * tcfg.data_parallel
            t_last, tokens_since = now, 0
            if main:
                log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if stop or leave or (tcfg.save_interval and step % tcfg.save_interval == 0):
            data_states = parallel.gather(batches.state())  # ranks may have consumed different counts
            checkpoint.save(ckpt_dir, step, model, optimizer, data_states, tcfg.keep_checkpoints, trainer,
                            layout_info, evaluator.state() if hasattr(evaluator, "state") else None,
                            frozen=tcfg.checkpoint_frozen)
        if leave:
            bar.write(f"step {step}: {leave}: checkpoint saved, exiting (run the same command to continue)")
        if stop or leave:
            break
    bar.close()
    if not row.get("exit"):
        export(model, tokenizer, os.path.join(tcfg.out, "final"), {"step": step}, save)
    return {**row, "best_step": trainer["best_step"], "best": trainer["best"]}


def _synced_seconds(device, since: float) -> float:
    """Seconds since `since` (perf_counter), the device's queued work included."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - since


def _exit_reason(tcfg: TrainConfig, step: int, started: float) -> str | None:
    """Megatron's --exit-interval / --exit-duration-in-mins, decided alike on every rank (the
    elapsed time is reduced, so no rank leaves alone)."""
    if step >= tcfg.steps:
        return None
    if tcfg.exit_interval and step % tcfg.exit_interval == 0:
        return f"--exit-interval {tcfg.exit_interval}"
    if tcfg.exit_duration_mins:
        (over,) = parallel.sum_all(float(time.monotonic() - started > tcfg.exit_duration_mins * 60))
        if over:
            return f"--exit-duration-in-mins {tcfg.exit_duration_mins:g}"
    return None


def export(model, tokenizer, folder: str, state: dict, save=save_pretrained) -> None:
    """HF-layout weights (or what `save` writes) + tokenizer + trainer_state.json in `folder`,
    replaced as a whole (`atomic.replace_folder`). Called on every rank (a sharded model's tensors are
    gathered one at a time); rank 0 writes."""
    from ..atomic import replace_folder, write_json

    def write(tmp: str) -> None:
        save(model, tmp)
        if parallel.is_main():
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            write_json(os.path.join(tmp, "trainer_state.json"), state)
    replace_folder(folder, write, swap=parallel.is_main())


def write_run_config(out: str, **parts) -> None:
    """The resolved configuration of a run, next to its outputs."""
    from ..atomic import write_json
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "run_config.json"), {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v)
                                                  for k, v in parts.items()})




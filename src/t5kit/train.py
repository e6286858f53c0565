"""One training loop for pretraining and fine-tuning.

bf16 autocast over fp32 master weights; gradient accumulation with the loss normalised by the
number of target tokens in the whole global batch (torchtitan `train.py`); clipping; optional
z-loss; periodic eval (loss, token accuracy); a tqdm bar; metrics.jsonl (and TensorBoard when
installed); atomic checkpoints with exact resume; final weights + tokenizer in <out>/final.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass


import torch
import torch.nn.functional as F

from . import checkpoint, distributed
from .hf import save_pretrained
from .optim import OptimConfig, build_optimizer, lr_at


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
    eval_iters: int = 4
    save_interval: int = 500
    keep_checkpoints: int = 3
    log_interval: int = 10
    seed: int = 1234
    world_size: int = 1

    def __post_init__(self):
        if self.global_batch % (self.micro_batch * self.world_size):
            raise ValueError(f"global batch {self.global_batch} is not divisible by micro batch {self.micro_batch} "
                             f"x world size {self.world_size}")

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)


def _tensors(batch: dict, device) -> dict:
    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


def loss_terms(model, batch: dict, z_loss: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (summed token CE [+ z-loss], number of target tokens, number correct)."""
    mask = batch["input_ids"] != 0
    logits = model(batch["input_ids"], batch["decoder_input_ids"], mask, segment_ids=batch.get("segment_ids"),
                   decoder_segment_ids=batch.get("decoder_segment_ids")).float()
    labels = batch["labels"]
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    valid = labels != -100
    if z_loss:  # t5x: z_loss * log(Z)^2 per target token
        loss = loss + z_loss * (torch.logsumexp(logits, -1)[valid] ** 2).sum()
    correct = ((logits.argmax(-1) == labels) & valid).sum()
    return loss, valid.sum(), correct


@torch.no_grad()
def evaluate(model, batches, iters: int, device, bf16: bool) -> dict:
    model.eval()
    total, tokens, correct = 0.0, 0, 0
    for _ in range(iters):
        with _autocast(device, bf16):
            loss, n, c = loss_terms(model, _tensors(next(batches), device), 0.0)
        total, tokens, correct = total + loss.item(), tokens + n.item(), correct + c.item()
    total, tokens, correct = distributed.sum_all(total, tokens, correct)
    model.train()
    return {"eval_loss": total / max(tokens, 1), "eval_accuracy": correct / max(tokens, 1)}


def _autocast(device, bf16: bool):
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


class MetricsLog:
    def __init__(self, out: str):
        self.path = os.path.join(out, "metrics.jsonl")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out, "tb"))
        except ImportError:
            pass

    def write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, row["step"])


def train(model, batches, eval_batches, tcfg: TrainConfig, ocfg: OptimConfig, tokenizer=None,
          resume: str | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Train `model` on `batches` (an iterator with state()/load_state()); returns the last log row."""
    from tqdm import tqdm

    os.makedirs(tcfg.out, exist_ok=True)
    model.to(device).train()
    optimizer = build_optimizer(model, ocfg)
    ckpt_dir = os.path.join(tcfg.out, "checkpoints")
    step = 0
    if resume:
        step, data_states = checkpoint.load(resume, model, optimizer)
        if len(data_states) != tcfg.world_size:
            raise ValueError(f"{resume}: checkpoint has data states for {len(data_states)} ranks, this run has "
                             f"{tcfg.world_size}; resume with the same number of processes")
        batches.load_state(data_states[distributed.rank()])
    ddp = distributed.wrap(model, device)
    main = distributed.is_main()
    log = MetricsLog(tcfg.out) if main else None
    bar = tqdm(total=tcfg.steps, initial=step, disable=not (progress and main), desc="train", unit="step")
    row: dict = {}
    t_last, tokens_since = time.perf_counter(), 0
    while step < tcfg.steps:
        lr = lr_at(step, ocfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [_tensors(next(batches), device) for _ in range(tcfg.accumulation)]
        local_tokens = sum(int((b["labels"] != -100).sum()) for b in micro)
        (n_tokens,) = distributed.sum_all(local_tokens)  # target tokens in the whole global batch
        total = 0.0
        for i, b in enumerate(micro):
            sync = i == len(micro) - 1 or ddp is model
            with (contextlib.nullcontext() if sync else ddp.no_sync()), _autocast(device, tcfg.bf16):
                loss, _, _ = loss_terms(ddp, b, tcfg.z_loss)
            # DDP averages gradients over ranks; scaling by world size makes it the global token sum
            (loss * tcfg.world_size / n_tokens).backward()
            total += loss.item()
        (total,) = distributed.sum_all(total)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.clip_grad or math.inf).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_since += sum(b["input_ids"].numel() + b["labels"].numel() for b in micro)
        row = {"step": step, "loss": total / n_tokens, "lr": lr, "grad_norm": grad_norm}
        if step % tcfg.log_interval == 0 or step == tcfg.steps:
            now = time.perf_counter()
            row["tokens_per_s"] = tokens_since / (now - t_last)
            t_last, tokens_since = now, 0
            row["tokens_per_s"] *= tcfg.world_size
            if tcfg.eval_interval and (step % tcfg.eval_interval == 0 or step == tcfg.steps) and eval_batches is not None:
                row.update(evaluate(model, eval_batches, tcfg.eval_iters, device, tcfg.bf16))
            if main:
                log.write(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if tcfg.save_interval and step % tcfg.save_interval == 0:
            data_states = distributed.gather(batches.state())  # ranks may have consumed different counts
            if main:
                checkpoint.save(ckpt_dir, step, model, optimizer, data_states, tcfg.keep_checkpoints)
    bar.close()
    if main:
        final = os.path.join(tcfg.out, "final")
        save_pretrained(model, final)
        if tokenizer is not None:
            tokenizer.save_pretrained(final)
    return row


def write_run_config(out: str, **parts) -> None:
    """The resolved configuration of a run, next to its outputs."""
    from .atomic import write_json
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "run_config.json"), {k: (asdict(v) if hasattr(v, "__dataclass_fields__") else v)
                                                  for k, v in parts.items()})




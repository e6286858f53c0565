"""Optimizers and learning-rate schedules (schedules are pure functions of the step).

- "adamw": torch.optim.AdamW (fused kernel where the device supports it).
- "adamw_scale": AdamW whose step is scaled per tensor by the parameter's RMS (Adafactor's
  relative step), the recipe nanoT5 used to match T5 v1.1 pretraining loss with AdamW.
- "adafactor": torch.optim.Adafactor.
Norm weights get no weight decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("constant", "cosine", "inverse-square-root", "linear")
OPTIMIZERS = ("adamw", "adamw_scale", "adafactor")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 100
    total_steps: int = 1000
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.name!r}: expected one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"lr schedule {self.schedule!r}: expected one of {SCHEDULES}")


def lr_at(step: int, c: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based). Warmup is linear from lr/warmup.

    >>> [round(lr_at(s, OptimConfig(lr=1.0, warmup_steps=2, total_steps=4, schedule="linear")), 2) for s in range(5)]
    [0.5, 1.0, 0.5, 0.0, 0.0]
    """
    if c.schedule == "inverse-square-root":  # T5: 1 / sqrt(max(step, warmup)), scaled so the peak is lr
        return c.lr * math.sqrt(max(c.warmup_steps, 1)) / math.sqrt(max(step + 1, c.warmup_steps, 1))
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    if c.schedule == "constant":
        return c.lr
    frac = min(1.0, (step + 1 - c.warmup_steps) / max(1, c.total_steps - c.warmup_steps))
    if c.schedule == "linear":
        return c.min_lr + (c.lr - c.min_lr) * (1 - frac)
    return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * frac))


class AdamWScale(torch.optim.AdamW):
    """AdamW with the update scaled by max(eps2, RMS(param)) per tensor (nanoT5 `AdamWScale`,
    after Adafactor's relative step size, Shazeer & Stern 2018 section 8)."""

    @torch.no_grad()
    def step(self, closure=None):
        before = {p: p.detach().clone() for g in self.param_groups for p in g["params"] if p.grad is not None}
        loss = super().step(closure)
        for p, old in before.items():
            rms = old.float().pow(2).mean().sqrt().clamp(min=1e-3)
            p.copy_(old + (p - old) * rms)
        return loss


def build_optimizer(model: torch.nn.Module, c: OptimConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("norm.weight")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("norm.weight")]
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if c.name == "adafactor":
        return torch.optim.Adafactor(groups, lr=c.lr)
    cls = AdamWScale if c.name == "adamw_scale" else torch.optim.AdamW
    fused = c.name == "adamw" and all(p.device.type in ("cuda", "cpu") for p in decay + no_decay)
    return cls(groups, lr=c.lr, betas=c.betas, eps=c.eps, **({"fused": True} if fused else {}))


def fp32_masters(optimizer: torch.optim.Optimizer) -> None:
    """bf16 parameters with fp32 master weights and fp32 optimizer state (Megatron-LM's
    `Float16OptimizerWithFloat16Params`), from outside the optimizer: around every step the
    parameters' storage is swapped for their fp32 masters (gradients cast to fp32), the optimizer
    steps in fp32, and each master is cast back into its parameter's own bf16 storage, once per
    step. That cast is the only one of the step: the forward and backward read the bf16 weights
    as they are. Masters live in the optimizer state under "master" (checkpointed with it); a
    parameter without one (a fresh run, --no-load-optim) gets it from its bf16 value, as Megatron
    makes its masters; loading a state keeps them fp32 (load_state_dict would cast state to the
parameters' dtype). Gradients stay bf16 until the step, accumulation included."""
    low: dict = {}  # parameter -> its bf16 storage while the masters are swapped in

    def swap_in(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                master = opt.state[p].get("master")
                grad = p.grad
                p.grad, low[p] = None, p.data
                p.data = master if master is not None else p.detach().float()
                if grad is not None:
                    p.grad = grad.float()

    def swap_out(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                master = p.data
                if opt.state[p]:  # an optimizer's own state starts with its first step on p
                    opt.state[p]["master"] = master
                p.grad, p.data = None, low.pop(p).copy_(master)

    def fp32_view(opt, state_dict):  # load_state_dict casts state to each parameter's dtype: keep fp32
        for group in opt.param_groups:
            for p in group["params"]:
                low[p], p.data = p.data, p.detach().float()

    def restore(opt):
        for group in opt.param_groups:
            for p in group["params"]:
                p.data = low.pop(p)

    optimizer.register_step_pre_hook(swap_in)
    optimizer.register_step_post_hook(swap_out)
    optimizer.register_load_state_dict_pre_hook(fp32_view)
    optimizer.register_load_state_dict_post_hook(restore)

"""Training checkpoints: model, optimizer, step, data-iterator state and RNG states in one file,
written atomically (a full disk or a kill mid-write leaves the previous checkpoint intact); the
last `keep` are kept. Final weights are exported in the HF layout through hf.py."""

from __future__ import annotations

import os
import random
import re

import numpy as np
import torch

from .atomic import atomic_path
from .config import T5Config

PATTERN = re.compile(r"step_(\d+)\.pt$")


def save(folder: str, step: int, model, optimizer, data_states: list[dict], keep: int = 3,
         trainer: dict | None = None) -> str:
    """data_states: one iterator state per rank, in rank order; trainer: the loop's own small state
    (best evaluation so far, evaluations without improvement)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step:08d}.pt")
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "config": model.config.to_hf_json(), "data": data_states, "trainer": trainer or {},
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                     **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for old in sorted(list_checkpoints(folder))[:-keep]:
        os.remove(old)
    return path


def list_checkpoints(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if PATTERN.search(f))


def latest(where: str) -> str | None:
    """Megatron's `--load DIR`: DIR is the `--save` directory of a run (its checkpoints live in
    DIR/checkpoints), a checkpoints folder itself, or one step_*.pt file. -> the newest checkpoint,
    or None when there is none yet (a first run of a restartable job starts fresh)."""
    if os.path.isfile(where):
        return where
    found = list_checkpoints(os.path.join(where, "checkpoints")) or list_checkpoints(where)
    return found[-1] if found else None


def load(path: str, model, optimizer, load_optim: bool = True, load_rng: bool = True,
         weights_only: bool = False) -> tuple[int, list[dict], dict]:
    """Restore a checkpoint file; -> (step, per-rank data states, trainer state). The model shape
    must match. weights_only (Megatron's --finetune): the model alone, step 0, no data or trainer
    state; load_optim / load_rng False (--no-load-optim / --no-load-rng) skip those states."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = T5Config.from_hf_json(state["config"], source=path)
    diff = [f"{k}: checkpoint {getattr(saved, k)} vs run {getattr(model.config, k)}"
            for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                      "feed_forward_proj", "tie_word_embeddings", "model_type")
            if getattr(saved, k) != getattr(model.config, k)]
    if diff:
        raise ValueError(f"{path}: checkpoint is for a different model shape ({'; '.join(diff)})")
    model.load_state_dict(state["model"])
    if weights_only:
        return 0, [], {}
    if load_optim:
        optimizer.load_state_dict(state["optimizer"])
    if load_rng:
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"], state["data"], state.get("trainer", {})

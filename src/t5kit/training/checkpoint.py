"""Training checkpoints through torch.distributed.checkpoint (DCP).

One directory per step, `<save>/checkpoints/step_00000042/`:
- the model and optimizer state as DCP shards, each rank writing its own (a replicated tensor
  once). Loading reshards to whatever layout loads it: 2 FSDP ranks -> 1 process, TP 2 -> TP 1,
  DDP -> FSDP;
- `extra.pt`: step, model config, the saving layout, the loop's trainer state, the data-iterator
  state of every data-parallel rank, the RNG states of every rank and, for an evaluator over fixed
  batches (pretraining's held-out set, `loop.HeldOut`), those batches.

Atomic: everything is written into `step_N.tmp/` and renamed once every rank has finished, so a
crash or a full disk mid-save leaves the previous checkpoint the latest. The last `keep` are
kept. Final weights are exported in the HF layout through hf.py.
"""

from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

from ..atomic import atomic_path
from ..model.config import T5Config
from . import parallel

PATTERN = re.compile(r"step_(\d+)$")
EXTRA = "extra.pt"
SHAPE_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
              "feed_forward_proj", "tie_word_embeddings", "model_type")


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def save(folder: str, step: int, model, optimizer, data_states: list[dict], keep: int = 3,
         trainer: dict | None = None, layout: dict | None = None, evaluation=None, frozen: bool = True) -> str:
    """Called on every rank. model: the parallelised model (not a DDP wrapper); data_states: one
    iterator state per data-parallel rank, in rank order; trainer: the loop's own small state
    (best evaluation so far, evaluations without improvement); layout: how the run was split;
    evaluation: the evaluator's state (its fixed batches, alike on every rank), or None;
    frozen False: parameters without gradients are left out (LoRA: the base model)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = os.path.join(folder, f"step_{step:08d}")
    tmp = path + ".tmp"
    main = parallel.is_main()
    if main:
        os.makedirs(folder, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save that crashed earlier
    parallel.barrier()
    model_state, optim_state = get_state_dict(model, optimizer, options=_options(frozen))
    try:
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
        rngs = parallel.gather(_rng_state(), data_parallel=False)
        if main:
            extra = {"step": step, "config": model.config.to_hf_json(), "data": data_states,
                     "trainer": trainer or {}, "rng": rngs, "layout": layout or {}, "evaluation": evaluation}
            with atomic_path(os.path.join(tmp, EXTRA)) as t:
                torch.save(extra, t)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. a full disk: the previous checkpoints stay as they were
        if isinstance(e, CheckpointException):  # DCP's wrapper around each rank's error: name the first
            first = next(iter(e.failures.values()))
            raise OSError(f"{path}: checkpoint not written ({first[0] if isinstance(first, tuple) else first}); "
                          f"the previous checkpoints are kept") from e
        raise
    if main:
        shutil.rmtree(path, ignore_errors=True)  # the same step saved again (an exit right after a save)
        os.rename(tmp, path)
        for old in list_checkpoints(folder)[:-keep]:
            shutil.rmtree(old)
    parallel.barrier()
    return path


def _options(frozen: bool):
    """DCP state-dict options: without parameters that get no gradient when `frozen` is False (and
    then loading leaves them as they are: strict would ask for them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(ignore_frozen_params=not frozen, strict=frozen)


def list_checkpoints(folder: str) -> list[str]:
    """Complete checkpoints in `folder`, oldest first (a `.tmp` one is a save that never finished)."""
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if PATTERN.fullmatch(f) and os.path.isfile(os.path.join(folder, f, EXTRA)))


def latest(where: str) -> str | None:
    """Megatron's `--load DIR`: DIR is the `--save` directory of a run (its checkpoints live in
    DIR/checkpoints), a checkpoints folder itself, or one step_* checkpoint. -> the newest
    checkpoint, or None when there is none yet (a first run of a restartable job starts fresh)."""
    if os.path.isfile(where) or os.path.isfile(os.path.join(where, EXTRA)):
        return where  # one checkpoint; a file (an old step_*.pt) is refused by `load`, not taken for "none yet"
    found = list_checkpoints(os.path.join(where, "checkpoints")) or list_checkpoints(where)
    return found[-1] if found else None


def read_extra(path: str) -> dict:
    try:
        return torch.load(os.path.join(path, EXTRA), map_location="cpu", weights_only=False)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{path}: not a t5kit checkpoint (no {EXTRA}); expected a step_* directory "
                                f"written by t5kit pretrain / finetune") from None


def load(path: str, model, optimizer, load_optim: bool = True, load_rng: bool = True,
         weights_only: bool = False, frozen: bool = True) -> tuple[int, list[dict], dict, object]:
    """Restore a checkpoint into the (parallelised) model and optimizer, on every rank; -> (step,
    per-data-parallel-rank iterator states, trainer state, evaluator state or None). The model
    shape must match. weights_only (Megatron's --finetune): the model alone, step 0, no data,
    trainer or evaluator state; load_optim / load_rng False (--no-load-optim / --no-load-rng) skip
    those states. The RNG states are per rank: a rank that did not exist when saving keeps its
    fresh seeding. frozen False: the trainable parameters only (as `save` wrote them)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    extra = read_extra(path)
    saved = T5Config.from_hf_json(extra["config"], source=path)
    diff = [f"{k}: checkpoint {getattr(saved, k)} vs run {getattr(model.config, k)}"
            for k in SHAPE_KEYS if getattr(saved, k) != getattr(model.config, k)]
    if diff:
        raise ValueError(f"{path}: checkpoint is for a different model shape ({'; '.join(diff)})")
    options = _options(frozen)
    state = {"model": get_model_state_dict(model, options=options)}
    with_optim = load_optim and not weights_only
    if with_optim:
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=options)
    try:
        dcp.load(state, checkpoint_id=path)
    except CheckpointException as e:  # each rank's error, as text (a BaseException)
        missing = re.search(r"^\w*Error: Missing key in checkpoint state_dict: (\S+?)\.?$", str(e), re.M)
        if missing is None:
            raise
        raise ValueError(f"{path}: the checkpoint has no {missing[1]!r}, which this run trains (saved by a run "
                         f"with other --lora-* flags, or with / without --lora-rank?)") from None
    set_model_state_dict(model, state["model"], options=options)
    if with_optim:
        set_optimizer_state_dict(model, optimizer, state["optim"], options=options)
    if weights_only:
        return 0, [], {}, None
    if load_rng and parallel.rank() < len(extra["rng"]):
        _set_rng_state(extra["rng"][parallel.rank()])
    return extra["step"], extra["data"], extra.get("trainer", {}), extra.get("evaluation")

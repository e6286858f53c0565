"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") in PEFT's format.

A target projection W (out, in) gains A (r, in) and B (out, r) and computes
    y = x W^T + scaling * B(A(dropout(x))),   scaling = alpha / r   (alpha / sqrt(r) with rsLoRA)
as peft's `tuners/lora/layer.py` Linear.forward does; A starts kaiming-uniform (a = sqrt(5)) and B
at zero, so training starts from the base model exactly. Targets are named as transformers and peft
name them: q k v o (self- and cross-attention), wi / wi_0 / wi_1 / wo; `all-linear` is every
projection but the LM head (peft's "all-linear").

On disk, as peft writes it: `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules,
base_model_name_or_path, ...) and `adapter_model.safetensors` with one pair per target module,
`base_model.model.<HF module name>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r). For
inference an adapter is merged into the weights as they load (`Adapter.merge`, used by
`hf.from_pretrained(adapter=...)`): W + scaling * B A, computed in fp32, so decoding runs at the
base model's speed. Freezing the base and training the adapters is the trainer's business.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import T5Config
from .hf import write_safetensors, hf_to_t5kit, t5kit_to_hf
from .hub import resolve_dir

TARGETS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")
ALL_LINEAR = "all-linear"
PREFIX = "base_model.model."  # PeftModel > LoraModel > the transformers model: peft's key prefix
CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def parse_targets(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'q,v' / ['q', 'v'] / 'all-linear' -> the module names, checked.

    >>> parse_targets("q, v,q")
    ('q', 'v')
    """
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if names == [ALL_LINEAR]:
        return (ALL_LINEAR,)
    for n in names:
        if n not in TARGETS:
            raise ValueError(f"--lora-targets: unknown module {n!r}: expected a comma-separated list of "
                             f"{', '.join(TARGETS)}, or {ALL_LINEAR}")
    if not names:
        raise ValueError(f"--lora-targets is empty: expected some of {', '.join(TARGETS)}, or {ALL_LINEAR}")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class LoraConfig:
    """A run's adapters: rank, alpha (scaling = alpha / rank), dropout on their input, the target
    module names (as peft's target_modules) and the base model they adapt."""
    r: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")
    base_model: str = ""

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"--lora-rank {self.r}: expected a rank >= 1")
        if self.alpha <= 0:
            raise ValueError(f"--lora-alpha {self.alpha}: expected a value > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora-dropout {self.dropout}: expected a value in [0, 1)")
        parse_targets(self.targets)

    def to_peft_json(self) -> dict:
        """adapter_config.json as peft's LoraConfig writes it (the fields every peft release reads)."""
        alpha = int(self.alpha) if float(self.alpha).is_integer() else self.alpha
        return {"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "base_model_name_or_path": self.base_model,
                "r": self.r, "lora_alpha": alpha, "lora_dropout": self.dropout, "target_modules": list(self.targets),
                "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
                "modules_to_save": None, "use_rslora": False, "use_dora": False, "rank_pattern": {},
                "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "revision": None}


class LoRALinear(nn.Module):
    """A bias-free projection plus a low-rank update. `weight` is the base Linear's own Parameter
    (same storage, dtype and device; the trainer freezes it), so state-dict keys stay `<name>.weight`
    beside `<name>.lora_A.weight` and `<name>.lora_B.weight`, peft's names. Not an nn.Linear on
    purpose: code that swaps or quantizes every nn.Linear (inference/cpu.py) reaches lora_A and lora_B
    and leaves the sum intact. x (..., in) -> (..., out)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear: T5 projections have no bias")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        # adapters in fp32 whatever the base's dtype (peft's autocast_adapter_dtype); --bf16-params
        # casts them with the model and keeps fp32 masters in the optimizer
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=base.weight.device)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()  # peft: Identity for p = 0
        self.scaling = alpha / r
        with torch.no_grad():  # peft reset_lora_parameters(init_lora_weights=True)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight)
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
        return out + (self.lora_B(h) * self.scaling).to(out.dtype)


def target_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """t5kit names of the projections `targets` picks (encoder.blocks.0.attn.q, ...), in module
    order. A named target the model lacks is an error (a gated FFN has wi_0 / wi_1, not wi)."""
    leaves = set(TARGETS) if tuple(targets) == (ALL_LINEAR,) else set(parse_targets(targets))
    found = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in leaves and ".lora_" not in name]
    missing = sorted(leaves - {n.rsplit(".", 1)[-1] for n in found})
    if missing and tuple(targets) != (ALL_LINEAR,):
        have = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
                      & set(TARGETS))
        raise ValueError(f"--lora-targets: module {', '.join(missing)} is not in this model; its projections "
                         f"are {', '.join(have)}")
    return found


def add_lora(model: nn.Module, cfg: LoraConfig, generator: torch.Generator | None = None) -> list[str]:
    """Replace each target projection of `model` by a LoRALinear over the same weight, in place.
    -> the target names. cfg.targets is resolved to the leaf names present (all-linear expanded,
    as peft writes target_modules)."""
    names = target_names(model, cfg.targets)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), cfg.r, cfg.alpha, cfg.dropout, generator))
    return names


def resolved_targets(names: Sequence[str]) -> tuple[str, ...]:
    """Leaf names of target modules, in TARGETS order: peft's target_modules for `names`."""
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    return tuple(t for t in TARGETS if t in leaves)


def peft_key(name: str, config: T5Config | None = None) -> str:
    """t5kit state-dict key of an adapter tensor -> peft's key (`config`: a LongT5 encoder's
    attention has its own module name, hf.t5kit_to_hf).

    >>> peft_key("decoder.blocks.1.cross.q.lora_B.weight")
    'base_model.model.decoder.block.1.layer.1.EncDecAttention.q.lora_B.weight'
    """
    module, _, tail = name.partition(".lora_")
    return PREFIX + t5kit_to_hf(module + ".weight", config).removesuffix(".weight") + ".lora_" + tail


def save_adapter(model: nn.Module, folder: str, cfg: LoraConfig) -> None:
    """adapter_model.safetensors (every lora_A / lora_B, under peft's keys) and adapter_config.json
    in `folder`, each written atomically. Called on every rank: sharded adapters are gathered one at
    a time (as hf.save_pretrained does); rank 0 writes."""
    import torch.distributed as dist

    from ..atomic import write_json
    main = not dist.is_initialized() or dist.get_rank() == 0
    state = {peft_key(k, getattr(model, "config", None)): v for k, v in model.state_dict().items() if ".lora_" in k}
    if main:
        os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, WEIGHTS_FILE), state, main)
    if main:
        write_json(os.path.join(folder, CONFIG_FILE), cfg.to_peft_json())


@dataclass
class Adapter:
    """A LoRA adapter read from a folder (t5kit's or peft's): per target module, by t5kit name,
    (A (r, in), B (out, r), scaling) in the file's dtype. `where` names the weights file."""
    where: str
    config: dict
    modules: dict[str, tuple[Tensor, Tensor, float]]

    @classmethod
    def read(cls, path_or_hub_id: str | os.PathLike) -> Adapter:
        folder = resolve_dir(path_or_hub_id, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_BIN])
        config = _read_config(os.path.join(folder, CONFIG_FILE))
        where, tensors = _read_weights(folder)
        pairs: dict[str, dict[str, Tensor]] = {}
        for key, t in tensors.items():
            m = _KEY.match(key)
            ours = hf_to_t5kit(m["module"] + ".weight") if m else None
            if ours is None or ours.rsplit(".", 2)[-2] not in TARGETS:
                raise ValueError(f"{where}: unexpected tensor {key!r}: expected only "
                                 f"{PREFIX}<T5 projection>.lora_A.weight / .lora_B.weight (LoRA on "
                                 f"{', '.join(TARGETS)})")
            pairs.setdefault(ours.removesuffix(".weight"), {})[m["ab"]] = t
        alpha_pattern = config.get("alpha_pattern") or {}
        modules = {}
        for name, ab in pairs.items():
            hf_name = t5kit_to_hf(name + ".weight").removesuffix(".weight")
            if set(ab) != {"A", "B"}:
                raise ValueError(f"{where}: module {hf_name} has lora_{''.join(ab)} but not "
                                 f"lora_{'B' if 'A' in ab else 'A'}")
            a, b = ab["A"], ab["B"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
                raise ValueError(f"{where}: module {hf_name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                                 f"are not (r, in) and (out, r) with one rank r >= 1")
            r = a.shape[0]
            # peft get_pattern_key: the first alpha_pattern key matching the end of the module's name
            key = next((k for k in alpha_pattern if re.match(rf"(.*\.)?({k})$", hf_name)), None)
            alpha = alpha_pattern[key] if key is not None else config["lora_alpha"]
            modules[name] = (a, b, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)
        if not modules:
            raise ValueError(f"{where}: no lora_A / lora_B tensors")
        return cls(where, config, modules)

    def check(self, shapes: dict[str, torch.Size], ignore: Callable[[str], bool] = lambda name: False) -> None:
        """Every adapted module exists in the model (`shapes`: t5kit weight name -> shape) with the
        shape the adapter was trained on; `ignore`d names (a T5Encoder's decoder side) are skipped."""
        for name, (a, b, _) in self.modules.items():
            weight = name + ".weight"
            if ignore(weight):
                continue
            hf_name = t5kit_to_hf(weight).removesuffix(".weight")
            if weight not in shapes:
                raise ValueError(f"{self.where}: module {hf_name} is not in this model (an adapter for another "
                                 f"base model: {self.config.get('base_model_name_or_path')!r}?)")
            out, inp = shapes[weight]
            if (b.shape[0], a.shape[1]) != (out, inp):
                raise ValueError(f"{self.where}: module {hf_name}: the adapter is for a ({b.shape[0]}, {a.shape[1]}) "
                                 f"weight, the model's is ({out}, {inp}) (an adapter for another base model: "
                                 f"{self.config.get('base_model_name_or_path')!r}?)")

    def merge(self, name: str, weight: Tensor) -> Tensor:
        """`weight` (t5kit name `name`) with its module's update added, W + scaling * B A, in fp32
        (peft `get_delta_weight` and `merge`), returned in weight's dtype; other tensors as given."""
        found = self.modules.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if found is None:
            return weight
        a, b, scaling = found
        return (weight.float() + (b.float() @ a.float()) * scaling).to(weight.dtype)


def _read_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; expected a LoRA adapter folder ({CONFIG_FILE} + "
                                f"{WEIGHTS_FILE}, as peft and t5kit finetune --lora-rank write it)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else config
        raise ValueError(f"{path}: peft_type {got!r}: only LORA adapters are supported")
    for flag, meaning in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out weights (GPT-2 Conv1D)")):
        if config.get(flag):
            raise ValueError(f"{path}: {flag} true: {meaning} is not supported")
    if not isinstance(config.get("lora_alpha"), (int, float)):
        raise ValueError(f"{path}: lora_alpha {config.get('lora_alpha')!r}: expected a number")
    return config


def _read_weights(folder: str) -> tuple[str, dict[str, Tensor]]:
    """(file, tensors) of adapter_model.safetensors, or of adapter_model.bin (older peft)."""
    path = os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(path):
        from safetensors.torch import load_file
        try:
            return path, load_file(path)
        except Exception as e:  # SafetensorError: truncated header, bad JSON, wrong sizes
            raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
    path = os.path.join(folder, WEIGHTS_BIN)
    if os.path.isfile(path):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a readable PyTorch file ({type(e).__name__}: {e})") from None
    raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE} (or {WEIGHTS_BIN})")

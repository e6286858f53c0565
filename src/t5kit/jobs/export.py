"""`t5kit export`: a base checkpoint with a LoRA adapter merged in, as a plain HF checkpoint that
transformers and CTranslate2 load, streamed tensor by tensor: each base tensor is read (memory-mapped),
its module's update added in fp32 (model/lora.Adapter.merge), cast, written and dropped, so the
whole model is never in memory. Tensor names, sharding at 5 GiB and config.json follow the base;
the folder is written beside its place and swapped in (atomic.replace_folder).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from ..atomic import replace_folder
from ..options import option
from .common import resolve_model_dir, say


@dataclass
class ExportConfig:
    """Merge a LoRA adapter into its base model and write a plain HF checkpoint."""
    model: str | None = option("the base model: HF directory or hub id", default=None)
    adapter: str | None = option("LoRA adapter folder or hub id (peft's format; t5kit finetune --lora-rank "
                                 "writes one to <save>/final)", default=None)
    out: str | None = option("output directory (replaced as a whole)", default=None)
    dtype: str | None = option("fp32 | bf16 | fp16 for every floating tensor (default: each as in the base)",
                               default=None)


class _Merged:
    """One output tensor, made when the writer reaches it (hf.write_checkpoint asks shape and size
    first, then `full_tensor()`): the base tensor plus its adapter update, in the output dtype."""

    def __init__(self, get, name: str | None, shape, dtype, adapter, cast):
        self.get, self.name, self.shape, self.adapter, self.cast = get, name, tuple(shape), adapter, cast
        self.dtype = (cast or dtype) if dtype.is_floating_point else dtype

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return self.dtype.itemsize

    def full_tensor(self):
        t = self.get()
        if self.name is not None:
            t = self.adapter.merge(self.name, t)
        return t.to(self.dtype)


def export(cfg: ExportConfig, progress: bool = True) -> dict:
    """-> {"out": folder, "tensors": n, "merged": modules merged, "dtype": ...}."""
    import torch

    from ..data.tokenizer import Tokenizer
    from ..model.config import T5Config
    from ..model.hf import weight_files, hf_to_t5kit, resolve_dtype, write_checkpoint
    from ..model.hub import resolve_dir
    from ..model.lora import Adapter
    from ..model.t5 import T5

    if not cfg.model or not cfg.adapter or not cfg.out:
        raise ValueError("--model, --adapter and --out are required")
    cast = resolve_dtype(cfg.dtype)
    folder = resolve_dir(resolve_model_dir(cfg.model), allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model"])
    config_path = os.path.join(folder, "config.json")
    config = T5Config.from_hf_json(config_path)
    adapter = Adapter.read(cfg.adapter)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in T5(config).state_dict().items()}
    adapter.check(shapes)
    kind, files = weight_files(folder)
    state, merged = {}, 0
    for key, (get, shape, dtype) in _tensors(kind, files).items():
        name = hf_to_t5kit(key)
        merged += name is not None and name.removesuffix(".weight") in adapter.modules
        state[key] = _Merged(get, name, shape, dtype, adapter, cast)
    if merged != len(adapter.modules):
        raise ValueError(f"{adapter.where}: {len(adapter.modules)} adapted modules, but {folder} holds the "
                         f"weights of {merged} of them")
    with open(config_path, encoding="utf-8") as f:
        hf_config = json.load(f)
    if cast is not None:
        hf_config["dtype"] = str(cast).removeprefix("torch.")
        hf_config.pop("torch_dtype", None)  # transformers < 5's name for it
    tok = None
    for where in (cfg.adapter, folder):
        try:
            tok = Tokenizer.from_pretrained(where)
            break
        except (FileNotFoundError, ValueError):
            continue
    if tok is None:
        say(f"no tokenizer in {cfg.adapter} or {folder}: {cfg.out} holds the weights only")

    def write(tmp: str) -> None:
        write_checkpoint(state, hf_config, tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
    replace_folder(os.fspath(cfg.out), write)
    say(f"wrote {cfg.out}: {len(state)} tensors, {merged} with the adapter merged")
    return {"out": os.fspath(cfg.out), "tensors": len(state), "merged": merged,
            "dtype": hf_config.get("dtype") or hf_config.get("torch_dtype")}


def _tensors(kind: str, files: list[str]) -> dict:
    """HF name -> (read it, shape, dtype) for every tensor of the checkpoint, nothing read yet:
    safetensors headers through safe_open's slices, .bin files memory-mapped."""
    import torch

    from ..model.hf import SAFE_DTYPES
    to_torch = {name: dtype for dtype, name in SAFE_DTYPES.items()}
    out = {}
    for path in files:
        if kind == "safetensors":
            from safetensors import safe_open
            handle = safe_open(path, framework="pt")
            for key in handle.keys():
                view = handle.get_slice(key)
                out[key] = (lambda h=handle, k=key: h.get_tensor(k), view.get_shape(), to_torch[view.get_dtype()])
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            out.update({k: (lambda t=t: t, t.shape, t.dtype) for k, t in sd.items()})
    return out

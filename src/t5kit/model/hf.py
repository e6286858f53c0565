"""Hugging Face checkpoints <-> t5kit: config.json, safetensors (single, sharded; memory-mapped),
pytorch_model.bin, hub ids (lazy huggingface_hub), and saving back in the HF layout. Full T5
checkpoints load into T5 or T5Encoder; encoder-only ones (T5EncoderModel) into T5Encoder.

Weight names are data: KEY_MAP is the one table, used in both directions. Loading is strict:
every tensor in the checkpoint is consumed, every parameter is filled, every shape matches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re

import torch

from ..atomic import atomic_path, write_json
from .config import T5Config
from .hub import resolve_dir
from .t5 import T5, T5Encoder

log = logging.getLogger(__name__)

# t5kit name template -> HF name template. {s}: encoder|decoder, {i}: block index, {p}: projection.
KEY_MAP = {
    "shared.weight": "shared.weight",
    "lm_head.weight": "lm_head.weight",
    "{s}.norm.weight": "{s}.final_layer_norm.weight",
    "{s}.blocks.{i}.rel_bias.weight": "{s}.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
    # LongT5 transient-global (longt5.py); before the generic attn entry, whose {p} would match them
    "encoder.blocks.{i}.attn.global_norm.weight":
        "encoder.block.{i}.layer.0.SelfAttention.global_input_layer_norm.weight",
    "encoder.blocks.{i}.attn.global_bias.weight":
        "encoder.block.{i}.layer.0.SelfAttention.global_relative_attention_bias.weight",
    "{s}.blocks.{i}.attn.{p}.weight": "{s}.block.{i}.layer.0.SelfAttention.{p}.weight",
    "{s}.blocks.{i}.attn_norm.weight": "{s}.block.{i}.layer.0.layer_norm.weight",
    "decoder.blocks.{i}.cross.{p}.weight": "decoder.block.{i}.layer.1.EncDecAttention.{p}.weight",
    "decoder.blocks.{i}.cross_norm.weight": "decoder.block.{i}.layer.1.layer_norm.weight",
    "encoder.blocks.{i}.ffn.{p}.weight": "encoder.block.{i}.layer.1.DenseReluDense.{p}.weight",
    "encoder.blocks.{i}.ffn_norm.weight": "encoder.block.{i}.layer.1.layer_norm.weight",
    "decoder.blocks.{i}.ffn.{p}.weight": "decoder.block.{i}.layer.2.DenseReluDense.{p}.weight",
    "decoder.blocks.{i}.ffn_norm.weight": "decoder.block.{i}.layer.2.layer_norm.weight",
}
# LongT5 names its encoder self-attention after the kind (HF LongT5LayerLocalSelfAttention, ...);
# KEY_MAP says SelfAttention, and these rename it on the way in and out.
LONG_ATTENTION_MODULE = {"local": "LocalSelfAttention", "transient-global": "TransientGlobalSelfAttention"}
_LONG_IN = re.compile(r"^(encoder\.block\.\d+\.layer\.0\.)(?:LocalSelfAttention|TransientGlobalSelfAttention)\.")
_LONG_OUT = re.compile(r"^(encoder\.block\.\d+\.layer\.0\.)SelfAttention\.")
# Older checkpoints (pytorch_model.bin) also store the shared table under each stack's name.
EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# The part of a full checkpoint T5Encoder has no use for: skipped by name, never read.
DECODER_SIDE = re.compile(r"^(decoder\.|lm_head\.weight$)")

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


def _compile(template: str) -> re.Pattern:
    rx = re.escape(template).replace(r"\{s\}", "(?P<s>encoder|decoder)").replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile("^" + rx.replace(r"\{p\}", r"(?P<p>\w+)") + "$")


_FORWARD = [(_compile(hf), ours) for ours, hf in KEY_MAP.items()]
_BACKWARD = [(_compile(ours), hf) for ours, hf in KEY_MAP.items()]


def _rename(name: str, table) -> str | None:
    for rx, template in table:
        m = rx.match(name)
        if m:
            return template.format(**m.groupdict())
    return None


def hf_to_t5kit(name: str) -> str | None:
    return _rename(_LONG_IN.sub(r"\1SelfAttention.", name), _FORWARD)


def t5kit_to_hf(name: str, config: T5Config | None = None) -> str:
    """The HF name of parameter `name`; `config` names a LongT5 encoder's attention module."""
    out = _rename(name, _BACKWARD)
    if out is None:
        raise KeyError(f"parameter {name!r} has no Hugging Face name in KEY_MAP")
    if config is not None and config.model_type == "longt5":
        out = _LONG_OUT.sub(rf"\1{LONG_ATTENTION_MODULE[config.encoder_attention_type]}.", out)
    return out


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} does not exist: expected one of {sorted(DTYPES)}") from None


def weight_files(folder: str, wanted=lambda key: True) -> tuple[str, list[str]]:
    """-> (kind, files) for the first weight layout present: safetensors, sharded, or .bin. Of a
    sharded checkpoint only the shards holding a `wanted` tensor (by the index) are listed."""
    for index, single, kind in ((SAFE_INDEX, SAFE_SINGLE, "safetensors"), (BIN_INDEX, BIN_SINGLE, "bin")):
        if os.path.isfile(os.path.join(folder, single)):
            return kind, [os.path.join(folder, single)]
        ipath = os.path.join(folder, index)
        if os.path.isfile(ipath):
            try:
                with open(ipath, encoding="utf-8") as f:
                    shards = sorted({shard for key, shard in json.load(f)["weight_map"].items() if wanted(key)})
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{ipath}: expected JSON with a 'weight_map' object ({e})") from None
            files = [os.path.join(folder, s) for s in shards]
            for fpath in files:
                if not os.path.isfile(fpath):
                    raise FileNotFoundError(f"{fpath}: shard listed in {ipath} is missing")
            return kind, files
    raise FileNotFoundError(f"{folder}: no weights found; expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}")


class _Reader:
    """Uniform access to tensors across checkpoint files, opened lazily (safetensors are mmapped)."""

    def __init__(self, kind: str, files: list[str], device: str):
        self.where: dict[str, tuple[str, object]] = {}
        for fpath in files:
            if kind == "safetensors":
                from safetensors import safe_open
                try:
                    handle = safe_open(fpath, framework="pt", device=str(device))
                    keys = list(handle.keys())
                except Exception as e:  # SafetensorError: truncated header, bad JSON, wrong sizes
                    raise ValueError(f"{fpath}: not a valid safetensors file ({e})") from None
                get = handle.get_tensor
            else:
                try:
                    sd = torch.load(fpath, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:
                    raise ValueError(f"{fpath}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
                keys, get = list(sd), sd.__getitem__
            for k in keys:
                if k in self.where:
                    raise ValueError(f"{fpath}: tensor {k!r} also stored in {self.where[k][0]}")
                self.where[k] = (fpath, get)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        fpath, get = self.where[key]
        try:
            return get(key)
        except Exception as e:
            raise ValueError(f"{fpath}: tensor {key!r} could not be read ({e})") from None


def from_pretrained(cls, path_or_hub_id: str | os.PathLike, dtype: str | torch.dtype | None = torch.float32,
                    device: str | torch.device = "cpu", adapter: str | os.PathLike | None = None) -> T5 | T5Encoder:
    """Load an HF T5 / mT5 / UMT5 / ByT5 / LongT5 checkpoint into a t5kit T5 or T5Encoder (in eval mode).
    T5Encoder takes encoder-only checkpoints and full ones, whose decoder and lm_head it skips
    unread: safetensors are memory-mapped and read tensor by tensor, and of a sharded checkpoint
    only the shards holding encoder tensors are opened. Every encoder tensor is still required.
    adapter: a LoRA adapter folder or hub id (peft's format, lora.py), merged into each weight as it
    loads, in fp32 before the cast to `dtype`: the model runs at the base model's speed."""
    dtype = resolve_dtype(dtype)
    folder = resolve_dir(path_or_hub_id, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model"])
    config = T5Config.from_hf_json(os.path.join(folder, "config.json"))
    encoder_only = issubclass(cls, T5Encoder)
    skipped = DECODER_SIDE.match if encoder_only else (lambda key: None)
    reader = _Reader(*weight_files(folder, wanted=lambda key: not skipped(key)), device="cpu")
    if not encoder_only and not any(k.startswith("decoder.") for k in reader.where):
        raise ValueError(f"{folder}: an encoder-only checkpoint (no decoder tensors; architectures "
                         f"{config.extra.get('architectures')}): load it with t5kit.T5Encoder.from_pretrained")
    copies = ["shared.weight", *EMBED_ALIASES] + (["lm_head.weight"] if config.tie_word_embeddings else [])
    copies = [k for k in copies if not skipped(k)]
    shared_key = next((k for k in copies if k in reader), None)  # the file's shared table, by any name
    if "lm_head.weight" in copies and "lm_head.weight" in reader and shared_key != "lm_head.weight":
        if not torch.equal(reader.get("lm_head.weight"), reader.get(shared_key)):
            # transformers does the same: a distinct lm_head in the file wins over the config's tie.
            log.warning("%s: config ties embeddings but lm_head.weight differs from %s; "
                        "loading them untied, as transformers does", folder, shared_key)
            config = config.replace(tie_word_embeddings=False)
            copies.remove("lm_head.weight")
    with torch.device("meta"):
        model = cls(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    lora = None
    if adapter is not None:
        from .lora import Adapter
        lora = Adapter.read(adapter)
        lora.check(expected, ignore=lambda name: bool(skipped(name)))
    state = {}
    for key in reader.where:
        if skipped(key):
            continue
        fpath = reader.where[key][0]
        name = "shared.weight" if key == shared_key else None if key in copies else hf_to_t5kit(key)
        if key in copies and name is None:  # a redundant copy of the shared table: shape-check only
            name = "shared.weight"
            if reader.get(key).shape != expected[name]:
                raise ValueError(f"{fpath}: tensor {key!r} has shape {tuple(reader.get(key).shape)}, "
                                 f"expected {tuple(expected[name])} (a copy of {shared_key})")
            continue
        if name is None or name not in expected:
            layers = (f"{config.num_layers} encoder layers" if encoder_only
                      else f"{config.num_layers}+{config.num_decoder_layers} layers")
            raise ValueError(f"{fpath}: unexpected tensor {key!r} (not part of a {config.model_type} "
                             f"{cls.__name__} with {layers})")
        t = reader.get(key)
        if t.shape != expected[name]:
            raise ValueError(f"{fpath}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(expected[name])}")
        state[name] = (lora.merge(name, t) if lora else t).to(device=device, dtype=dtype or t.dtype)
    missing = [t5kit_to_hf(k, config) for k in expected if k not in state]
    if missing:
        raise ValueError(f"{folder}: checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def save_pretrained(model: T5 | T5Encoder, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json + model.safetensors (or shards + index) in the HF layout, each file
    atomically; `transformers` loads it with no missing or unexpected keys (a T5Encoder as
    T5EncoderModel: its config.json names that architecture).

    A model sharded by FSDP or tensor parallelism is exported alike, called on every rank: each
    tensor is gathered whole in turn (DTensor.full_tensor), streamed into the file by rank 0 and
    dropped, so no rank ever holds more than one full tensor beside its own shards."""
    cfg = model.config.to_hf_json(encoder_only=isinstance(model, T5Encoder))
    cfg["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    write_checkpoint({t5kit_to_hf(k, model.config): v for k, v in model.state_dict().items()}, cfg, out_dir,
                     max_shard_bytes)


def write_checkpoint(state: dict, config: dict, out_dir: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    """HF-named tensors -> model.safetensors (or shards + index) and config.json in out_dir, each
    file atomically, on every rank (rank 0 writes). A value needs only shape, dtype, numel(),
    element_size() until its turn: one with `full_tensor()` (a DTensor, or a tensor produced on
    demand: jobs/export.py) is made whole then, written and dropped."""
    import torch.distributed as dist

    main = not dist.is_initialized() or dist.get_rank() == 0
    out_dir = os.fspath(out_dir)
    shards: list[list[str]] = [[]]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    names = [SAFE_SINGLE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if main:
        os.makedirs(out_dir, exist_ok=True)
    for name, keys in zip(names, shards):
        write_safetensors(os.path.join(out_dir, name), {k: state[k] for k in keys}, main)
    if not main:
        return
    stale = [SAFE_INDEX] if len(shards) == 1 else [SAFE_SINGLE]
    stale += [f for f in os.listdir(out_dir) if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f) and f not in names]
    if len(shards) > 1:
        write_json(os.path.join(out_dir, SAFE_INDEX), {
            "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
            "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}})
    for f in stale:
        if os.path.exists(os.path.join(out_dir, f)):
            os.remove(os.path.join(out_dir, f))
    write_json(os.path.join(out_dir, "config.json"), config)


SAFE_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: str, tensors: dict, write: bool) -> None:
    """One safetensors file, written tensor by tensor: the header (names, dtypes, shapes, byte
    offsets) is known from the shapes alone, then each tensor's bytes follow in header order
    (the format: an 8-byte little-endian header length, the JSON header padded to 8 bytes, the
    data; huggingface/safetensors README). safetensors' own save_file needs every tensor in
    memory at once. Sharded tensors are gathered here on every rank; only `write` writes."""
    import struct

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        header[k] = {"dtype": SAFE_DTYPES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with (atomic_path(path) if write else contextlib.nullcontext()) as tmp, \
            (open(tmp, "wb") if write else contextlib.nullcontext()) as f:
        if write:
            f.write(struct.pack("<Q", len(blob)) + blob)
        for v in tensors.values():
            full = v.full_tensor() if hasattr(v, "full_tensor") else v  # a DTensor's gather: every rank
            if write:
                f.write(full.detach().contiguous().cpu().view(torch.uint8).numpy())  # a buffer: no copy
            del full

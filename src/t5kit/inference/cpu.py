"""Weights laid out for CPU inference, applied from outside the model (it stays trainable code):

- `pack_linears`: every nn.Linear becomes a `PackedLinear`. A decode step's (the decoder's and the
  LM head's GEMVs) hold their weight in the layout measured fastest on this machine for that
  weight's shape (`choose_layout`); those that read the source (the encoder's, cross-attention's k
  and v), called with every token of a batch at once, in oneDNN's default packing (issue 20: 11% off
  a 4k-token LongT5 forward). The layouts (LAYOUTS): oneDNN's blocked layout, the layout its GEMM
  kernels read (what inductor's CPU `freezing` does for compiled graphs), packed without or with a
  batch-1 hint, the same with calls of 1-3 rows padded to 4, the weight as it is, for MKL's GEMV /
  GEMM behind F.linear, or 32-row panels for t5kit's own kernel (`cpu_kernel`, fp32, built on first
  use). Same fp32 arithmetic, float rounding aside. Measured on a 2-core AVX-512
  Intel CPU, packing made t5-small greedy decoding 1.4-1.7x faster than PyTorch's default path,
  which repacks the weight on every call (the 32k x 512 LM head alone: 6 ms per call unpacked, 2 ms
  packed); issue 19 asked that the layout be chosen per CPU class rather than assumed.
- `fuse_qkv`: each decoder block's self-attention q, k and v become one (3*H*D, C) Linear, so a
  decode step runs one GEMV there instead of three (`Attention.project_qkv`).
- `quantize_int8`: PyTorch's dynamic quantization (fbgemm / x86 kernels, int8 weights per output
  channel, activations quantized on the fly), over the fused q/k/v too: the three share their input,
  so its one dynamic scale is the one each would get, and per-channel weights quantize row by row.

All take a T5 or a T5Encoder (`t5kit embed`), and give a tied LM head its own copy of the embedding
table, so the model is for inference only.
"""

from __future__ import annotations

import functools
import json
import os
import time
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..atomic import write_json
from ..model.t5 import T5, T5Encoder
from . import cpu_kernel

# How a Linear's weight is held (PackedLinear): oneDNN's blocked layout for any batch (PyTorch's
# default hint), the same packed for one row (a decode step at batch 1), the default packing called
# with at least PAD_ROWS rows, row-major for F.linear, or t5kit's panels for cpu_kernel.linear
# (fp32 only, where its library builds: `candidates`).
LAYOUTS = ("onednn", "onednn_b1", "onednn_pad4", "plain", "t5kit")
DEFAULT_LAYOUT = "onednn"  # the layout of every earlier release: kept unless another is clearly faster
MARGIN = 0.9  # another layout is chosen only when it takes under 90% of the default's time
# onednn_pad4: a call with fewer rows (a decode step at batch 1-3) is padded with zero rows to this
# many. On an AMD EPYC Zen 4 (AVX-512, 2 threads) oneDNN's kernel for 4 rows read the default-packed
# weight faster than its 1-row path (t5-base 768 x 3072: 413 -> 307 us, the LM head 3.68 -> 3.19 ms;
# 2 or 8 rows: no gain); with AVX2 kernels it did not pay, hence a timed choice (docs/inference.md).
PAD_ROWS = 4
TIMED_ROWS = (1, 4, 16)  # rows per call timed: a batch-1 decode step, beam 4, batch 16
_CHOSEN: dict[tuple, str] = {}  # layout_key -> layout: timed once per CPU model, kernels and shape, kept on disk


@functools.cache
def cpu_info() -> dict:
    """The CPU's model name and the ISA flags that pick oneDNN's, MKL's and fbgemm's kernels (Linux's
    /proc/cpuinfo; "unknown" and no flags elsewhere). AMX shows as amx_tile."""
    name, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"cpu": name, "cpu_flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile")}}


def _last_level_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs); 32 MiB where it cannot be read."""
    import glob
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        with open(path) as f:
            text = f.read().strip()
        sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text))
    return max(sizes, default=32 * 2**20)


def _onednn_linear(x: Tensor, weight: Tensor, out_features: int, pad_rows: int) -> Tensor:
    """x (..., in) @ W^T for a oneDNN-packed W (out, in) -> (..., out); a call of fewer than
    pad_rows rows is padded with zero rows to pad_rows (onednn_pad4; each row's result is its own)."""
    in_features = x.shape[-1]
    rows = x.numel() // in_features
    if rows >= pad_rows:
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    flat = x.reshape(rows, in_features)  # (R, in) -> (pad_rows, in)
    padded = torch.cat([flat, flat.new_zeros(pad_rows - rows, in_features)])
    y = torch.ops.mkldnn._linear_pointwise(padded, weight, None, "none", [], "")
    return y[:rows].reshape(*x.shape[:-1], out_features)


# Both kernels as operators of their own, for torch.compile (`--decode-mode compile`): inductor lowers
# mkldnn._linear_pointwise only over weights it packed itself as frozen constants, which it does not
# do here (engine._compile), so the compiled decode step calls this as one opaque kernel over the
# packed weight and fuses everything around it (norms, residuals, the cache write), which removes
# the per-op dispatch of the eager step. Eager calls go straight to _onednn_linear: an operator
# call costs a few microseconds more, on 100+ GEMVs a step.
onednn_linear = torch.library.custom_op("t5kit::onednn_linear", _onednn_linear, mutates_args=())


panel_linear = torch.library.custom_op("t5kit::panel_linear", cpu_kernel.linear, mutates_args=())


@onednn_linear.register_fake
def _(x: Tensor, weight: Tensor, out_features: int, pad_rows: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


@panel_linear.register_fake
def _(x: Tensor, panels: Tensor, out_features: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class PackedLinear(nn.Module):
    """y = x W^T with W (out, in) held in `layout` (one of LAYOUTS); x (..., in) -> (..., out)."""

    def __init__(self, weight: Tensor, layout: str):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"CPU weight layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
        if layout == "t5kit" and weight.dtype != torch.float32:
            raise ValueError(f"CPU weight layout t5kit holds fp32 weights only; got {weight.dtype}")
        if layout == "t5kit" and not cpu_kernel.available():
            raise ValueError(f"CPU weight layout t5kit is unavailable here: {cpu_kernel.unavailable_reason()}")
        self.out_features, self.in_features = weight.shape
        self.layout = layout
        self.pad_rows = PAD_ROWS if layout == "onednn_pad4" else 0
        weight = weight.detach().contiguous()
        if layout == "plain":
            self.weight = weight
        elif layout == "t5kit":
            self.weight = cpu_kernel.to_panels(weight)  # (ceil(out / 32), in, 32)
        else:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1 if layout == "onednn_b1" else None)

    def forward(self, x: Tensor) -> Tensor:
        if self.layout == "plain":
            return F.linear(x, self.weight)
        if self.layout == "t5kit":
            return (panel_linear if torch.compiler.is_compiling() else cpu_kernel.linear)(x, self.weight,
                                                                                         self.out_features)
        linear = onednn_linear if torch.compiler.is_compiling() else _onednn_linear
        return linear(x, self.weight, self.out_features, self.pad_rows)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}"


def can_pack(dtype: torch.dtype) -> bool:
    """oneDNN is in PyTorch's x86 / arm CPU builds; bf16 needs CPU support (avx512_bf16 / AMX)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def candidates(dtype: torch.dtype) -> tuple[str, ...]:
    """The layouts a weight of this dtype can take here: LAYOUTS, less t5kit's for non-fp32 weights
    or where its kernel does not build (`cpu_kernel.available`)."""
    own = dtype == torch.float32 and cpu_kernel.available()
    return tuple(name for name in LAYOUTS if name != "t5kit" or own)


def layout_key(shape: tuple[int, int], dtype: torch.dtype) -> tuple:
    """What a layout decision holds for: the CPU model, the kernels (PyTorch's CPU capability and a
    cap on oneDNN's ISA, which the environment can lower: ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA),
    the thread count, the dtype and the (out, in) shape. Decisions timed with AVX-512 kernels were
    once reused under forced AVX2 ones, where padding to 4 rows loses."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "all"
    kernels = f"{torch.backends.cpu.get_cpu_capability()}/{isa}"
    return cpu_info()["cpu"], kernels, torch.get_num_threads(), str(dtype), *shape


def forced_layout() -> str | None:
    """The layout $T5KIT_CPU_LAYOUT names for every weight, or None (unset, empty or `timed`)."""
    env = os.environ.get("T5KIT_CPU_LAYOUT", "")
    if env not in (*LAYOUTS, "", "timed"):
        raise ValueError(f"T5KIT_CPU_LAYOUT={env!r}: expected one of {', '.join(LAYOUTS)} or timed")
    return env if env in LAYOUTS else None


def choose_layout(shape: tuple[int, int], dtype: torch.dtype) -> str:
    """The layout for an (out, in) weight: $T5KIT_CPU_LAYOUT if it names one; else the decision
    made for this CPU model, kernels, thread count and dtype (`layout_key`), in this process or
    saved by an earlier one (`_disk`); else, or with T5KIT_CPU_LAYOUT=timed, the fastest by
    `time_layouts` and `fastest`, saved. (Until issue 19's second pass AVX-512 CPUs kept
    DEFAULT_LAYOUT untimed, because the one-row timing alone once chose the batch-1 hint, which
    costs every multi-row step; `fastest` now refuses a layout that slows multi-row calls.)"""
    forced = forced_layout()
    if forced:
        return forced
    key = layout_key(shape, dtype)
    if key not in _CHOSEN:
        saved = _disk()
        name = "|".join(map(str, key))
        if saved.get(name) not in candidates(dtype) or os.environ.get("T5KIT_CPU_LAYOUT") == "timed":
            saved[name] = fastest(time_layouts(shape, dtype))
            try:
                write_json(_disk_path(), {"rule": _rule(), "layouts": saved})
            except OSError as e:  # a read-only home: decide again in the next process
                warnings.warn(f"CPU layout decisions not saved to {_disk_path()}: {e}", stacklevel=2)
        _CHOSEN[key] = saved[name]
    return _CHOSEN[key]


def _rule() -> str:
    """What a saved decision depends on besides its key (another rule, another decision): the layouts
    timed (t5kit's among them where its kernel builds, and which version of it), the rows, margin and
    padding."""
    own = f"t5kit {cpu_kernel.version()}" if cpu_kernel.available() else "no t5kit"
    return f"{','.join(LAYOUTS)} ({own});rows {','.join(map(str, TIMED_ROWS))};margin {MARGIN};pad {PAD_ROWS}"


def _disk_path() -> str:
    return os.path.join(cpu_kernel.cache_dir(), "cpu-layouts.json")


def _disk() -> dict[str, str]:
    """Decisions saved by earlier processes (timing a t5-base's shapes takes ~3 s of every start
    otherwise), as {"cpu|kernels|threads|dtype|out|in": layout}; nothing when the file is missing,
    unreadable or was written under another rule."""
    try:
        with open(_disk_path()) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    ok = isinstance(saved, dict) and saved.get("rule") == _rule() and isinstance(saved.get("layouts"), dict)
    return dict(saved["layouts"]) if ok else {}


def fastest(seconds: dict[str, dict[int, float]]) -> str:
    """From {layout: {rows per call: seconds}} (`time_layouts`): the layout fastest at one row among
    those no slower than the default at every larger row count (within the margin: a batch-1 win
    must not cost beams and batches), if it takes under MARGIN of the default's one-row time; else
    the default. Timing noise must not move a machine off the layout that served it (issue 19: no
    cost to AVX-512 Intel CPUs).

    >>> fastest({"onednn": {1: 1.0, 16: 2.0}, "onednn_b1": {1: 0.5, 16: 3.0}, "plain": {1: 0.8, 16: 2.1}})
    'plain'
    >>> fastest({"onednn": {1: 1.0, 16: 2.0}, "onednn_b1": {1: 0.5, 16: 3.0}, "plain": {1: 0.92, 16: 2.0}})
    'onednn'
    """
    default = seconds[DEFAULT_LAYOUT]
    fair = [name for name, t in seconds.items() if all(t[r] * MARGIN <= default[r] for r in t if r > 1)]
    best = min(fair, key=lambda name: seconds[name][1])
    return best if seconds[best][1] < MARGIN * default[1] else DEFAULT_LAYOUT


def time_layouts(shape: tuple[int, int], dtype: torch.dtype, rounds: int = 5) -> dict[str, dict[int, float]]:
    """Seconds per call of an (out, in) weight in each layout, for each row count in TIMED_ROWS, the
    weights cold as in a decode step, where the whole model streams from memory: each pass calls
    enough copies to fill twice the last-level cache (at most 64). Layouts take turns, so each sees
    the same machine noise, and each keeps its fastest pass (noise only adds time). Weights larger
    than that (an mT5 LM head: 250k rows) are timed over their first rows: a GEMV's cost per byte
    no longer depends on its size there."""
    span = 2 * _last_level_cache_bytes()
    row_bytes = shape[1] * torch.finfo(dtype).bits // 8
    out_f, in_f = min(shape[0], max(1, span // row_bytes)), shape[1]
    copies = max(1, min(64, -(-span // (out_f * row_bytes))))
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_f, in_f, generator=gen).to(dtype)
    xs = {rows: torch.randn(rows, in_f, generator=gen).to(dtype) for rows in TIMED_ROWS}
    layouts = {name: [PackedLinear(weight.clone(), name) for _ in range(copies)] for name in candidates(dtype)}
    best = {name: dict.fromkeys(TIMED_ROWS, float("inf")) for name in layouts}
    with torch.inference_mode():
        for r in range(rounds + 1):  # the first pass warms up (first-call primitive creation)
            for rows, x in xs.items():
                for name, mods in layouts.items():
                    t0 = time.perf_counter()
                    for m in mods:
                        m(x)
                    if r:
                        best[name][rows] = min(best[name][rows], (time.perf_counter() - t0) / copies)
    return best


@torch.no_grad()
def fuse_qkv(model: T5) -> T5:
    """Each decoder block's self-attention q, k, v (plain nn.Linear, not adapted or sharded) as one
    `attn.qkv` Linear over their concatenated weights, rows [q; k; v]; q, k and v become None."""
    for blk in model.decoder.blocks:
        a = blk.attn
        if a.qkv is None and all(type(m) is nn.Linear for m in (a.q, a.k, a.v)):
            w = torch.cat([a.q.weight, a.k.weight, a.v.weight])  # (3*H*D, C)
            # skip_init: no random init, which would draw from the global generator that `--seed` set
            a.qkv = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
            a.qkv.weight.copy_(w)
            a.q = a.k = a.v = None
    return model


@torch.no_grad()
def _own_storage(model: T5 | T5Encoder) -> T5 | T5Encoder:
    """The parameters and buffers left after the Linears were converted, copied out of whatever
    storage they share, so that a checkpoint's memory map (hf.from_pretrained maps safetensors) is
    released: the embedding alone holds it open, and with it every weight page that converting read,
    a second copy of the model in the resident set (clean file pages, reclaimable, but counted by RSS
    and cgroup limits; 230 MB of a LongT5-base encoder). Parameters shared by modules stay shared."""
    for t in [*model.parameters(), *model.buffers()]:
        t.data = t.data.clone()
    return model


def _own_lm_head(model: T5) -> None:
    """Tied models read the LM head from `shared`; give them a Linear to convert (a copy)."""
    if model.lm_head is None:
        model.lm_head = nn.utils.skip_init(nn.Linear, model.config.d_model, model.config.vocab_size, bias=False)
        model.lm_head.weight = nn.Parameter(model.shared.weight.detach().clone())


@torch.no_grad()
def pack_linears(model: T5 | T5Encoder, layouts: str | dict[tuple[int, int], str] | None = None) -> T5 | T5Encoder:
    """Fuse the decoder's q/k/v, then lay every Linear out for CPU (eval only), in place; returns
    the model. layouts: a name in LAYOUTS holds for every weight, as $T5KIT_CPU_LAYOUT's does; else
    the decode step's weights get a dict's name for their (out, in) shape, or the chosen one
    (`choose_layout`, timed for decode steps of 1-16 rows), and the weights that read the source
    (the encoder's, and cross-attention's k and v, run once per request) DEFAULT_LAYOUT: their
    calls carry every token of a batch (rows >= 4 but for the shortest inputs), where oneDNN's
    default packing beat MKL's GEMM behind F.linear by 8-35% on a 2-core Zen 4 at 4,096 rows
    (768-wide t5-base shapes), whichever layout won the decode timing. Without oneDNN for the
    weights' dtype the model is returned as it is."""
    w = model.shared.weight
    if w.device.type != "cpu":
        raise ValueError(f"packing is for CPU inference; the model is on {w.device}")
    if not can_pack(w.dtype):
        return model
    model.eval()
    reads_source = {id(m) for m in model.encoder.modules()}  # the modules called with every source token
    if isinstance(model, T5):
        _own_lm_head(model)
        fuse_qkv(model)
        # cross-attention's k and v (once per request); its q and o run per step
        reads_source |= {id(m) for blk in model.decoder.blocks for part in (blk.cross.k, blk.cross.v)
                         for m in part.modules()}
    source_layout = forced_layout() or DEFAULT_LAYOUT
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                if child.bias is not None:
                    raise ValueError("PackedLinear: T5 projections have no bias")
                shape = tuple(child.weight.shape)
                if isinstance(layouts, str):
                    layout = layouts
                elif id(child) in reads_source:
                    layout = source_layout
                else:
                    layout = (layouts or {}).get(shape) or choose_layout(shape, w.dtype)
                setattr(module, name, PackedLinear(child.weight, layout))
    return _own_storage(model)


def quantize_int8(model: T5 | T5Encoder) -> T5 | T5Encoder:
    """Quantize in place (CPU, eval only) and return the model. Embeddings and norms stay fp32."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if next(model.parameters()).device.type != "cpu":
        raise ValueError("--quantize int8 runs on CPU only (PyTorch's int8 dynamic kernels)")
    model.float().eval()
    if isinstance(model, T5):
        _own_lm_head(model)
        fuse_qkv(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notices; the kernels are current
        return _own_storage(quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                                             inplace=True))


def for_inference(model: T5 | T5Encoder, quantize: str | None = None) -> T5 | T5Encoder:
    """The CPU inference layout the jobs use (generate, evaluate, serve, embed): int8 when asked
    (`--quantize int8`), else packed weights on CPU (every decode mode: a compiled step calls them
    through `onednn_linear`); a model on another device is returned as it is."""
    if quantize == "int8":
        return quantize_int8(model)
    if quantize is not None:
        raise ValueError(f"--quantize {quantize!r}: expected int8")
    return pack_linears(model) if model.shared.weight.device.type == "cpu" else model

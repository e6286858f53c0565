"""Weights laid out for CPU inference, applied from outside the model (it stays trainable code):

- `pack_linears`: every nn.Linear becomes a `PackedLinear` whose weight is reordered once into
  oneDNN's blocked layout, the layout its GEMM kernels read (what inductor's CPU `freezing` does
  for compiled graphs). Same fp32 arithmetic, float rounding aside; measured on a 2-core x86 CPU,
  t5-small greedy decoding ran 1.4-1.7x faster and beam 4 more, with identical ids: PyTorch's
  default path repacks the weight on every call, which dominates a one-token step (the 32k x 512
  LM head alone took 6 ms per call unpacked, 2 ms packed).
- `quantize_int8`: PyTorch's dynamic quantization (fbgemm / x86 kernels, int8 weights per output
  channel, activations quantized on the fly).

Both give a tied LM head its own copy of the embedding table, so the model is for inference only.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..model.t5 import T5


def _own_lm_head(model: T5) -> None:
    """Tied models read the LM head from `shared`; give them a Linear to convert (a copy)."""
    if model.lm_head is None:
        model.lm_head = nn.Linear(model.config.d_model, model.config.vocab_size, bias=False)
        model.lm_head.weight = nn.Parameter(model.shared.weight.detach().clone())


class PackedLinear(nn.Module):
    """y = x W^T with W held in oneDNN's blocked layout; x (..., in) -> (..., out)."""

    onednn_packed = True  # engine.py refuses to torch.compile these (inductor packs its own)

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PackedLinear: T5 projections have no bias")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")


def can_pack(dtype: torch.dtype) -> bool:
    """oneDNN is in PyTorch's x86 / arm CPU builds; bf16 needs CPU support (avx512_bf16 / AMX)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@torch.no_grad()
def pack_linears(model: T5) -> T5:
    """Pack every Linear in place (CPU, eval only) and return the model; a no-op where oneDNN
    cannot run the weights' dtype."""
    w = model.shared.weight
    if w.device.type != "cpu":
        raise ValueError(f"packing is for CPU inference; the model is on {w.device}")
    if not can_pack(w.dtype):
        return model
    model.eval()
    _own_lm_head(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child))
    return model


def quantize_int8(model: T5) -> T5:
    """Quantize in place (CPU, eval only) and return the model. Embeddings and norms stay fp32."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if next(model.parameters()).device.type != "cpu":
        raise ValueError("--quantize int8 runs on CPU only (PyTorch's int8 dynamic kernels)")
    model.float().eval()
    _own_lm_head(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notices; the kernels are current
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def for_inference(model: T5, quantize: str | None = None, decode_mode: str = "auto") -> T5:
    """The CPU inference layout the jobs use: int8 when asked (`--quantize int8`), else packed
    weights on CPU, except for decode_mode "compile" (inductor packs them itself); a model on
    another device is returned as it is."""
    if quantize == "int8":
        return quantize_int8(model)
    if quantize is not None:
        raise ValueError(f"--quantize {quantize!r}: expected int8")
    cpu = model.shared.weight.device.type == "cpu"
    return pack_linears(model) if cpu and decode_mode != "compile" else model

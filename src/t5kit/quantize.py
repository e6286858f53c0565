"""Weight-only-style int8 for CPU inference: PyTorch's dynamic quantization (fbgemm / x86 kernels,
int8 weights per output channel, activations quantized on the fly). Applied from outside the
model: every nn.Linear is swapped, and a tied LM head is given its own int8 copy of the table."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .model import T5


def quantize_int8(model: T5) -> T5:
    """Quantize in place (CPU, eval only) and return the model. Embeddings and norms stay fp32."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if next(model.parameters()).device.type != "cpu":
        raise ValueError("--quantize int8 runs on CPU only (PyTorch's int8 dynamic kernels)")
    model.float().eval()
    if model.lm_head is None:  # tied: the head gets its own (quantized) copy of the shared table
        model.lm_head = nn.Linear(model.config.d_model, model.config.vocab_size, bias=False)
        model.lm_head.weight = nn.Parameter(model.shared.weight.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notices; the kernels are current
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)

"""t5kit: T5-family encoder-decoder models in PyTorch, exact against Hugging Face, and fast.

The public API (README, "Python API"); these names stay stable whatever moves inside:
- models: T5, T5Encoder, T5Config, get_preset, PRESETS; tokenizers: Tokenizer, train_tokenizer;
- inference: GenerationConfig, for_inference, quantize_int8;
- the jobs with their configs: pretrain, finetune, evaluate, embed, demo, export (a LoRA adapter
  merged into its base); serve with ServeConfig.

Importing binds the loading / saving / generation methods onto T5 and T5Encoder: they live in
model/hf.py and inference/generate.py, above model/t5.py, which cannot import them (DESIGN.md,
import rule). The jobs and the server load on first use (PEP 562), so `import t5kit` stays as
light as the model itself.
"""

from .data.tokenizer import Tokenizer, train_tokenizer
from .inference import generate as _generate
from .inference.cpu import for_inference, quantize_int8
from .inference.generation import GenerationConfig
from .model import hf as _hf
from .model.config import PRESETS, T5Config, get_preset
from .model.t5 import T5, T5Encoder

T5.from_pretrained = classmethod(_hf.from_pretrained)
T5.save_pretrained = _hf.save_pretrained
T5.generate = _generate.generate
T5Encoder.from_pretrained = classmethod(_hf.from_pretrained)
T5Encoder.save_pretrained = _hf.save_pretrained

_LAZY = {"pretrain": "jobs.pretrain", "PretrainConfig": "jobs.pretrain", "finetune": "jobs.finetune",
         "FinetuneConfig": "jobs.finetune", "evaluate": "jobs.evaluate", "EvalConfig": "jobs.evaluate",
         "embed": "jobs.embed", "EmbedConfig": "jobs.embed", "demo": "jobs.demo", "DemoConfig": "jobs.demo",
         "export": "jobs.export", "ExportConfig": "jobs.export", "serve": "serving.server",
         "ServeConfig": "serving.server"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 't5kit' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = ["T5", "T5Encoder", "T5Config", "PRESETS", "get_preset", "Tokenizer", "train_tokenizer",
           "GenerationConfig", "for_inference", "quantize_int8", "pretrain", "PretrainConfig", "finetune",
           "FinetuneConfig", "evaluate", "EvalConfig", "embed", "EmbedConfig", "demo", "DemoConfig", "export",
           "ExportConfig", "serve",
           "ServeConfig", "__version__"]

"""t5kit: T5-family encoder-decoder models in PyTorch, exact against Hugging Face, and fast.

Public API (see README): T5, T5Encoder, T5Config, PRESETS, Tokenizer, and the jobs pretrain /
finetune / evaluate / embed / demo with their config dataclasses. Importing has no side effects
beyond binding the loading / saving / generation methods onto T5 and T5Encoder: they live in
hf.py and generate.py, which import model.py, so model.py cannot import them (DESIGN.md,
dependency direction).
"""

from . import generate as _generate
from . import hf as _hf
from .config import PRESETS, T5Config, get_preset
from .model import T5, T5Encoder
from .tokenizer import Tokenizer, train_tokenizer

T5.from_pretrained = classmethod(_hf.from_pretrained)
T5.save_pretrained = _hf.save_pretrained
T5.generate = _generate.generate
T5Encoder.from_pretrained = classmethod(_hf.from_pretrained)
T5Encoder.save_pretrained = _hf.save_pretrained

# The jobs load on first use (PEP 562), so `import t5kit` stays as light as the model itself.
_JOBS = {"pretrain": "jobs", "finetune": "jobs", "evaluate": "jobs", "embed": "jobs", "PretrainConfig": "jobs",
         "FinetuneConfig": "jobs", "EvalConfig": "jobs", "EmbedConfig": "jobs", "demo": "demo_job",
         "DemoConfig": "demo_job"}


def __getattr__(name: str):
    if name in _JOBS:
        import importlib
        return getattr(importlib.import_module(f".{_JOBS[name]}", __name__), name)
    raise AttributeError(f"module 't5kit' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = ["T5", "T5Encoder", "T5Config", "PRESETS", "get_preset", "Tokenizer", "train_tokenizer", "pretrain",
           "finetune", "evaluate", "embed", "demo", "PretrainConfig", "FinetuneConfig", "EvalConfig", "EmbedConfig",
           "DemoConfig", "__version__"]

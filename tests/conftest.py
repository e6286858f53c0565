"""Shared fixtures: real Hugging Face checkpoints built by `transformers` itself (random init with a
fixed seed, save_pretrained to a temp dir), in both forms the foundation issue names:

- "hf5": as transformers 5.x creates it (tie_word_embeddings true, scale_decoder_outputs recorded);
- "released": as the published v1.1 / Flan / mT5 / UMT5 / ByT5 checkpoints are (a distinct
  lm_head.weight in the safetensors file and "tie_word_embeddings": false in config.json).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

SMALL = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)

# name -> (transformers config class name, model class name, config overrides, form)
VARIANTS = {
    "t5-v1_0": ("T5Config", "T5ForConditionalGeneration", dict(vocab_size=300), "hf5"),
    "t5-v1_1": ("T5Config", "T5ForConditionalGeneration", dict(vocab_size=300, feed_forward_proj="gated-gelu"), "released"),
    "t5-v1_1-hf5": ("T5Config", "T5ForConditionalGeneration",
                    dict(vocab_size=300, feed_forward_proj="gated-gelu", tie_word_embeddings=False), "hf5"),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", dict(vocab_size=500, feed_forward_proj="gated-gelu"), "released"),
    "umt5": ("UMT5Config", "UMT5ForConditionalGeneration",
             dict(vocab_size=300, feed_forward_proj="gated-gelu", num_decoder_layers=3), "hf5"),
    "umt5-released": ("UMT5Config", "UMT5ForConditionalGeneration",
                      dict(vocab_size=300, feed_forward_proj="gated-gelu"), "released"),
    "byt5": ("T5Config", "T5ForConditionalGeneration",
             dict(vocab_size=384, feed_forward_proj="gated-gelu", num_layers=3, num_decoder_layers=1), "released"),
    "odd-shape": ("T5Config", "T5ForConditionalGeneration",
                  dict(vocab_size=300, d_kv=5, num_heads=3, relative_attention_num_buckets=16,
                       relative_attention_max_distance=20, feed_forward_proj="gated-relu"), "hf5"),
}


def build_hf_checkpoint(name: str, folder: str, seed: int = 0):
    """Random-init HF model of `name`, saved in its form; returns the folder."""
    cfg_cls, model_cls, overrides, form = VARIANTS[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**{**SMALL, **overrides})
    model = getattr(transformers, model_cls)(cfg).eval()
    model.save_pretrained(folder)
    if form == "released":
        from safetensors.torch import load_file, save_file
        path = os.path.join(folder, "model.safetensors")
        tensors = load_file(path)
        gen = torch.Generator().manual_seed(seed + 1)
        tensors["lm_head.weight"] = torch.randn(tensors["shared.weight"].shape, generator=gen)
        save_file(tensors, path, metadata={"format": "pt"})
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        config["tie_word_embeddings"] = False
        config.pop("scale_decoder_outputs", None)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
    return folder


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """hf_dir(name) -> folder of that variant's checkpoint (built once per session)."""
    cache = {}

    def get(name: str) -> str:
        if name not in cache:
            cache[name] = build_hf_checkpoint(name, str(tmp_path_factory.mktemp(name)))
        return cache[name]
    return get


def load_hf(folder: str):
    """The oracle: transformers' own from_pretrained of the files."""
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(folder).eval()


def padded_batch(vocab: int, lengths=(150, 100, 31), seed: int = 0):
    """(B, S) ids ending in EOS with unequal lengths, right-padded with 0, and the mask."""
    gen = torch.Generator().manual_seed(seed)
    s = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), s), generator=gen)
    mask = (torch.arange(s)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    ids[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = 1
    return ids, mask

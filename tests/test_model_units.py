"""Bucket function vs the published tables, and config semantics."""

import pytest
import torch

import t5kit
from t5kit.model.config import PRESETS, T5Config
from t5kit.model.t5 import relative_position_bucket

# T5_REFERENCE.md 3.2 (derived tables): (lo, hi) distance ranges -> bucket
BIDIRECTIONAL = [(8, 11, 8), (12, 15, 9), (16, 22, 10), (23, 31, 11), (32, 45, 12), (46, 63, 13), (64, 90, 14), (91, 300, 15)]
CAUSAL = [(16, 18, 16), (19, 20, 17), (21, 23, 18), (24, 26, 19), (27, 30, 20), (31, 34, 21), (35, 39, 22), (40, 45, 23),
          (46, 51, 24), (52, 58, 25), (59, 66, 26), (67, 76, 27), (77, 86, 28), (87, 98, 29), (99, 112, 30), (113, 300, 31)]


def _expected(table, exact, dist):
    if dist < exact:
        return dist
    return next(b for lo, hi, b in table if lo <= dist <= hi)


def test_bidirectional_buckets_match_published_table():
    rel = torch.arange(-300, 301)
    got = relative_position_bucket(rel, True, 32, 128).tolist()
    for r, g in zip(rel.tolist(), got):
        assert g == _expected(BIDIRECTIONAL, 8, abs(r)) + (16 if r > 0 else 0), r


def test_causal_buckets_match_published_table():
    rel = torch.arange(-300, 301)
    got = relative_position_bucket(rel, False, 32, 128).tolist()
    for r, g in zip(rel.tolist(), got):
        assert g == _expected(CAUSAL, 16, max(-r, 0)), r


@pytest.mark.hf
@pytest.mark.parametrize("name", ["t5-small", "t5-v1_1-small", "mt5-small", "umt5-small", "byt5-small", "t5-3b"])
def test_preset_param_counts_match_transformers(name):
    transformers = pytest.importorskip("transformers")
    cfg = PRESETS[name]
    hf_cfg = {"t5": transformers.T5Config, "mt5": transformers.MT5Config, "umt5": transformers.UMT5Config}[cfg.model_type]
    with torch.device("meta"):
        ref = transformers.AutoModelForSeq2SeqLM.from_config(hf_cfg(**cfg.to_hf_json()))
        ours = t5kit.T5(cfg)
    n_ref = sum(p.numel() for p in ref.parameters()) + (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.d_model)
    assert sum(p.numel() for p in ours.parameters()) == cfg.num_params() == n_ref


def test_published_shapes():
    assert PRESETS["t5-base"].num_params() == 222_903_552
    assert PRESETS["t5-v1_1-base"].num_params() == 247_577_856
    assert PRESETS["t5-11b"].inner_dim == 16384 != PRESETS["t5-11b"].d_model
    assert (PRESETS["byt5-base"].num_layers, PRESETS["byt5-base"].num_decoder_layers) == (18, 6)


def test_hf_json_semantics():
    cfg = T5Config.from_hf_json({"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu", "tie_word_embeddings": False})
    assert cfg.activation == "gelu_new" and not cfg.scale_decoder_outputs  # dense_act_fn is ignored, as in HF
    assert T5Config.from_hf_json({}).scale_decoder_outputs  # v1.0 default: tied and rescaled
    assert not T5Config.from_hf_json({"model_type": "mt5"}).scale_decoder_outputs
    assert not T5Config.from_hf_json({"scale_decoder_outputs": False}).scale_decoder_outputs
    assert T5Config.from_hf_json({"num_layers": 3}).num_decoder_layers == 3
    again = T5Config.from_hf_json(PRESETS["umt5-small"].to_hf_json())
    assert again == PRESETS["umt5-small"]


@pytest.mark.parametrize("data, field", [
    ({"feed_forward_proj": "gated-swish"}, "feed_forward_proj"),
    ({"feed_forward_proj": "relu-gated"}, "feed_forward_proj"),
    ({"feed_forward_proj": "relu", "is_gated_act": True}, "is_gated_act"),
    ({"d_model": 512, "hidden_size": 768}, "hidden_size"),
    ({"model_type": "bart"}, "model_type"),
    ({"num_heads": 0}, "num_heads"),
])
def test_bad_config_names_the_field(data, field):
    with pytest.raises(ValueError, match=field):
        T5Config.from_hf_json(data, source="x/config.json")

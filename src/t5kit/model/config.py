"""T5Config: the architecture of a T5-family model, named presets, and the HF config.json mapping.

Standard library only. Field names follow Hugging Face's `T5Config` so a config.json reads across
one to one; semantics that HF derives (activation, output rescale) are resolved here, once.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

MODEL_TYPES = ("t5", "mt5", "umt5", "longt5")
ACTIVATIONS = ("relu", "gelu", "gelu_new")
LONG_ATTENTION = ("local", "transient-global")  # LongT5's encoder self-attention (HF LongT5Config)
LONG_FIELDS = ("encoder_attention_type", "local_radius", "global_block_size")  # in config.json for longt5 only


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # per-head size; num_heads * d_kv may differ from d_model (t5-3b, t5-11b)
    d_ff: int = 2048
    num_layers: int = 6  # encoder layers
    num_decoder_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" | "gated-gelu" | "gated-relu" | "gelu"
    tie_word_embeddings: bool = True  # lm_head shares the input embedding (T5 v1.0)
    # Multiply decoder output by d_model**-0.5 before the LM head. Mesh TF / HF 4.x do this exactly
    # when embeddings are tied; HF 5.x records it separately because it ties every model it creates.
    scale_decoder_outputs: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    model_type: str = "t5"  # "umt5": every self-attention layer owns its relative-bias table
    # LongT5 (model_type "longt5", Guo et al. 2022; model/longt5.py): the encoder attends a band of
    # local_radius tokens either side, and with "transient-global" also one summary token per
    # global_block_size tokens. HF LongT5Config's defaults.
    encoder_attention_type: str = "local"
    local_radius: int = 127
    global_block_size: int = 16
    extra: dict = field(default_factory=dict, compare=False, hash=False)  # unmodelled HF fields

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r}: expected one of {MODEL_TYPES}")
        self.activation  # validates feed_forward_proj
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected a positive integer")
        if self.num_decoder_layers < 0:
            raise ValueError(f"num_decoder_layers={self.num_decoder_layers}: expected >= 0")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate={self.dropout_rate}: expected a value in [0, 1)")
        if self.encoder_attention_type not in LONG_ATTENTION:
            raise ValueError(f"encoder_attention_type={self.encoder_attention_type!r}: expected one of {LONG_ATTENTION}")
        if int(self.local_radius) < 0 or int(self.global_block_size) < 1:
            raise ValueError(f"local_radius={self.local_radius!r}, global_block_size={self.global_block_size!r}: "
                             "expected an integer >= 0 and one >= 1")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """The FFN nonlinearity. HF: 'gated-gelu' forces gelu_new (tanh GELU), whatever
        `dense_act_fn` says in config.json (configuration_t5.py, backwards compatibility)."""
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or parts[-1] not in ACTIVATIONS:
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r}: expected 'ACT' or 'gated-ACT' "
                f"with ACT one of {ACTIVATIONS}")
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return parts[-1]

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def per_layer_bias(self) -> bool:
        return self.model_type == "umt5"

    @property
    def transient_global(self) -> bool:
        """LongT5 with global tokens: each encoder layer norms its own, layer 0 owns their bias table."""
        return self.model_type == "longt5" and self.encoder_attention_type == "transient-global"

    def replace(self, **changes) -> "T5Config":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count of T5 built from this config (embedding counted once when tied)."""
        d, f, inner = self.d_model, self.d_ff, self.inner_dim
        ffn = d * f * (3 if self.is_gated else 2) + d
        attn = 4 * d * inner + d
        nb = self.relative_attention_num_buckets * self.num_heads
        enc_bias = nb * (self.num_layers if self.per_layer_bias else 1)
        dec_bias = nb * (self.num_decoder_layers if self.per_layer_bias else 1) if self.num_decoder_layers else 0
        enc = self.num_layers * (attn + ffn) + d + enc_bias
        if self.transient_global:  # a global-token norm per layer, the global bias table in layer 0
            enc += self.num_layers * d + nb
        dec = self.num_decoder_layers * (2 * attn + ffn) + d + dec_bias
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return enc + dec + emb

    # ---- HF config.json ----

    @classmethod
    def from_hf_json(cls, data: dict | str, source: str = "config.json") -> "T5Config":
        """Build from an HF config.json dict (or its path). Errors name `source` and the field."""
        if isinstance(data, str):
            source = data
            try:
                with open(data, encoding="utf-8") as f:
                    data = json.load(f)
            except FileNotFoundError:
                raise FileNotFoundError(f"{data}: config.json not found") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}: not valid JSON ({e})") from None
        model_type = data.get("model_type", "t5")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"{source}: model_type={model_type!r}: expected one of {MODEL_TYPES}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kw = {k: data[k] for k in known if k in data and data[k] is not None}
        kw["model_type"] = model_type
        if kw.get("num_decoder_layers") is None:
            kw["num_decoder_layers"] = kw.get("num_layers", cls.num_layers)
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        tie = bool(data.get("tie_word_embeddings", True))  # PretrainedConfig default: True
        kw["tie_word_embeddings"] = tie
        if "scale_decoder_outputs" in data:  # written by transformers >= 5
            kw["scale_decoder_outputs"] = bool(data["scale_decoder_outputs"])
        elif model_type == "mt5":
            # transformers 5 MT5 never rescales; every released mT5 is untied, so 4.x agrees.
            kw["scale_decoder_outputs"] = False
        else:
            kw["scale_decoder_outputs"] = tie
        if "is_gated_act" in data and bool(data["is_gated_act"]) != kw.get("feed_forward_proj", "relu").startswith("gated-"):
            raise ValueError(f"{source}: is_gated_act={data['is_gated_act']} contradicts "
                             f"feed_forward_proj={kw.get('feed_forward_proj')!r}")
        if "d_model" in data and "hidden_size" in data and data["hidden_size"] != data["d_model"]:
            raise ValueError(f"{source}: hidden_size={data['hidden_size']} contradicts d_model={data['d_model']}")
        kw["extra"] = {k: v for k, v in data.items() if k not in known}
        try:
            return cls(**kw)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf_json(self, encoder_only: bool = False) -> dict:
        """The HF config.json dict; `encoder_only` names T5EncoderModel (MT5EncoderModel, ...), the
        class transformers builds for a checkpoint holding only `shared` and `encoder.*`."""
        out = {k: v for k, v in self.extra.items()
               if k not in ("architectures", "dense_act_fn", "is_gated_act", "transformers_version")}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name != "extra" and (self.model_type == "longt5" or f.name not in LONG_FIELDS)})
        out.update({
            "architectures": [{"t5": "T5", "mt5": "MT5", "umt5": "UMT5", "longt5": "LongT5"}[self.model_type]
                              + ("EncoderModel" if encoder_only else "ForConditionalGeneration")],
            "dense_act_fn": self.activation,
            "is_gated_act": self.is_gated,
            "is_encoder_decoder": not encoder_only,
        })
        return out


def _p(**kw) -> T5Config:
    kw.setdefault("num_decoder_layers", kw["num_layers"])
    return T5Config(**kw)


def _v11(vocab=32128, model_type="t5", **kw) -> T5Config:
    return _p(vocab_size=vocab, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
              scale_decoder_outputs=False, model_type=model_type, **kw)


# Published shapes: the config.json of each released checkpoint (google/* and google-t5/* on the Hub).
_V11_SHAPES = {  # t5-v1_1, flan-t5, mt5 and umt5 share these shapes
    "small": dict(d_model=512, d_ff=1024, num_layers=8, num_heads=6),
    "base": dict(d_model=768, d_ff=2048, num_layers=12, num_heads=12),
    "large": dict(d_model=1024, d_ff=2816, num_layers=24, num_heads=16),
    "xl": dict(d_model=2048, d_ff=5120, num_layers=24, num_heads=32),
    "xxl": dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64),
}
_BYT5_SHAPES = {
    "small": dict(d_model=1472, d_ff=3584, num_layers=12, num_decoder_layers=4, num_heads=6),
    "base": dict(d_model=1536, d_ff=3968, num_layers=18, num_decoder_layers=6, num_heads=12),
    "large": dict(d_model=1536, d_ff=3840, num_layers=36, num_decoder_layers=12, num_heads=16),
    "xl": dict(d_model=2560, d_ff=6720, num_layers=36, num_decoder_layers=12, num_heads=32),
    "xxl": dict(d_model=4672, d_ff=12352, num_layers=36, num_decoder_layers=12, num_heads=64),
}

PRESETS: dict[str, T5Config] = {
    # A few-second model for tests and the CPU demo; v1.1 style (gated-GELU, untied).
    "tiny": _v11(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
    # Minutes-scale CPU models for the English -> French demo (`t5kit demo --preset`).
    "micro": _v11(d_model=128, d_kv=32, d_ff=384, num_layers=3, num_heads=4),
    "mini": _v11(d_model=256, d_kv=32, d_ff=768, num_layers=4, num_heads=8),
    "t5-small": _p(d_model=512, d_ff=2048, num_layers=6, num_heads=8),
    "t5-base": _p(d_model=768, d_ff=3072, num_layers=12, num_heads=12),
    "t5-large": _p(d_model=1024, d_ff=4096, num_layers=24, num_heads=16),
    "t5-3b": _p(d_model=1024, d_kv=128, d_ff=16384, num_layers=24, num_heads=32),
    "t5-11b": _p(d_model=1024, d_kv=128, d_ff=65536, num_layers=24, num_heads=128),
    **{f"t5-v1_1-{s}": _v11(**shape) for s, shape in _V11_SHAPES.items()},
    **{f"flan-t5-{s}": _v11(**shape) for s, shape in _V11_SHAPES.items()},
    **{f"mt5-{s}": _v11(vocab=250112, model_type="mt5", **shape) for s, shape in _V11_SHAPES.items()},
    **{f"byt5-{s}": _v11(vocab=384, **shape) for s, shape in _BYT5_SHAPES.items()},
    **{f"umt5-{s}": _v11(vocab=256384, model_type="umt5", **_V11_SHAPES[s]) for s in ("small", "base", "xl", "xxl")},
    # google/long-t5-{local,tglobal}-{base,large,xl}: v1.1 shapes, local_radius 127, global blocks of 16.
    **{f"long-t5-{kind}-{s}": _v11(model_type="longt5", encoder_attention_type=attn, **_V11_SHAPES[s])
       for kind, attn in (("local", "local"), ("tglobal", "transient-global")) for s in ("base", "large", "xl")},
}


def get_preset(name: str) -> T5Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}: expected one of {', '.join(PRESETS)}") from None

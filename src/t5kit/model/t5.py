"""The T5 family (T5 v1.0/v1.1, Flan-T5, mT5, ByT5, UMT5) as one encoder-decoder module.

Shape legend (nanoGPT style):
  B batch   S source (encoder) length   T target (decoder) length   K key length
  L decoder cache length   H heads   D head size (d_kv)   C d_model   F d_ff   V vocab

Every T5 quirk needed to match Hugging Face checkpoints bit for bit is commented where it lives;
`../shared/T5_REFERENCE.md` section 3 collects the sources. The module knows nothing of training,
data or parallelism: those are applied from outside.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import FlexBias, Keep, attend, mask_bias, relative_position_bucket, use_flex
from .cache import DecodeCache
from .config import T5Config

if TYPE_CHECKING:  # FlexAttention is imported lazily, by attention.py
    from torch.nn.attention.flex_attention import BlockMask


class RMSNorm(nn.Module):
    """T5 LayerNorm: scale only, no mean subtraction, no bias; variance in fp32 (HF T5LayerNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class RelativeBias(nn.Module):
    """Learned per-head bias over bucketed relative positions. `weight` is (buckets, H), as HF's
    `relative_attention_bias` Embedding. Cross-attention never has one (HF PR #8518)."""

    def __init__(self, cfg: T5Config, bidirectional: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.relative_attention_num_buckets, cfg.num_heads))
        self.bidirectional = bidirectional
        self.max_distance = cfg.relative_attention_max_distance

    def forward(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """q_pos (B|1, T), k_pos (B|1, K) integer positions -> bias (B|1, H, T, K)."""
        rel = k_pos[:, None, :] - q_pos[:, :, None]  # (B|1, T, K)
        buckets = relative_position_bucket(rel, self.bidirectional, self.weight.shape[0], self.max_distance)
        return F.embedding(buckets, self.weight).permute(0, 3, 1, 2)  # (B|1, T, K, H) -> (B|1, H, T, K)


def segment_positions(segment_ids: Tensor) -> Tensor:
    """Position of each token within its packed segment. (B, N) -> (B, N).

    >>> segment_positions(torch.tensor([[1, 1, 1, 2, 2, 0]])).tolist()
    [[0, 1, 2, 0, 1, 0]]
    """
    idx = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return idx - torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values


class Attention(nn.Module):
    """Multi-head attention with no 1/sqrt(D) scale: T5 folds it into the q init (t5x layers.py,
    "folded into the initializers"), so the kernel gets scale=1.0. Bias carries position and mask:
    a dense Tensor (SDPA) or an attention.FlexBias (FlexAttention); attention.attend runs either."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.h, self.d = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.o = nn.Linear(cfg.inner_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout_rate
        # q, k and v as one (3*H*D, C) projection, set by inference/cpu.py for decoding (q, k and
        # v are then None): one GEMV per step instead of three (issue 19). Not a parameter name.
        self.qkv: nn.Module | None = None

    def split(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape  # H is the local share of heads when the projections are split by head
        return x.view(b, n, -1, self.d).transpose(1, 2)  # (B, N, H*D) -> (B, H, N, D)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.split(self.k(x)), self.split(self.v(x))  # 2 x (B, H, K, D)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, C) -> q, k, v, 3 x (B, H, T, D): self-attention's projections, fused or not."""
        if self.qkv is None:  # k and v before q, the order of earlier releases (compiled training's rounding)
            k, v = self.project_kv(x)
            return self.split(self.q(x)), k, v
        return self.split(self.qkv(x)).chunk(3, dim=1)  # (B, T, 3*H*D) -> (B, 3*H, T, D) -> 3 x (B, H, T, D)

    def attend(self, q: Tensor, kv: tuple[Tensor, Tensor], bias: Tensor | FlexBias) -> Tensor:
        """q (B, H, T, D), kv 2 x (B, H, K, D), bias (B|1, H|1, T, K) or FlexBias -> (B, T, C)."""
        b, _, t, _ = q.shape
        out = attend(q, kv[0], kv[1], bias, self.dropout if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))  # (B, H, T, D) -> (B, T, H*D)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], bias: Tensor | FlexBias) -> Tensor:
        """x (B, T, C), kv 2 x (B, H, K, D), bias (B|1, H|1, T, K) or FlexBias -> (B, T, C)."""
        return self.attend(self.split(self.q(x)), kv, bias)  # q (B, H, T, D)


class FeedForward(nn.Module):
    """v1.0: wo(relu(wi x)). v1.1 and descendants: wo(gelu_tanh(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gated = cfg.is_gated
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        act = cfg.activation
        self.act = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}[act]
        self.drop = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        h = self.drop(h)
        # HF keeps `wo` in fp32 under half precision (_keep_in_fp32_modules) and casts to it.
        w = self.wo.weight  # a method, not a Tensor, once quantized
        return self.wo(h.to(w.dtype) if isinstance(w, Tensor) and w.is_floating_point() else h)


def _clamp_fp16(x: Tensor) -> Tensor:
    """HF T5Block: in fp16 only, clamp to finfo.max - 1000 when an inf appeared (no sync)."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-limit, max=limit)


class EncoderBlock(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.rel_bias = RelativeBias(cfg, bidirectional=True) if has_bias else None
        self.attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        if cfg.model_type == "longt5":  # local / transient-global self-attention (issue 20)
            from .longt5 import LongAttention  # imported here: longt5.py builds on this module
            self.attn = LongAttention(cfg, has_bias)
        else:
            self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.ffn = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        h = self.attn_norm(x)  # pre-norm residual: x + Dropout(Sublayer(RMSNorm(x)))
        x = _clamp_fp16(x + self.drop(self.attn(h, self.attn.project_kv(h), bias)))
        return _clamp_fp16(x + self.drop(self.ffn(self.ffn_norm(x))))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.rel_bias = RelativeBias(cfg, bidirectional=False) if has_bias else None
        self.attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.cross_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.cross = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.ffn = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor, self_bias: Tensor, cross_bias: Tensor, memory: Tensor | None = None,
                cache: DecodeCache | None = None, layer: int = 0) -> Tensor:
        """memory (B, S, C): the encoder output, projected to this block's cross K/V here (inside
        the block's forward, where its weights are in hand when sharded, parallel.py). With a
        cache, the cross K/V are the cache's; x's keys are written at the cache position and all
        keys so far attended."""
        h = self.attn_norm(x)
        q, k, v = self.attn.project_qkv(h)
        kv = (k, v) if cache is None else cache.write(layer, (k, v))
        cross_kv = cache.cross_kv[layer] if cache is not None else self.cross.project_kv(memory)
        x = _clamp_fp16(x + self.drop(self.attn.attend(q, kv, self_bias)))
        x = _clamp_fp16(x + self.drop(self.cross(self.cross_norm(x), cross_kv, cross_bias)))
        return _clamp_fp16(x + self.drop(self.ffn(self.ffn_norm(x))))


class Stack(nn.Module):
    """Blocks plus final norm. Block 0 owns the relative-bias table and the bias it gives is
    reused by every later block (HF passes `position_bias` along); UMT5 gives each block its own."""

    def __init__(self, cfg: T5Config, block: type, n: int):
        super().__init__()
        self.blocks = nn.ModuleList(block(cfg, has_bias=cfg.per_layer_bias or i == 0) for i in range(n))
        self.norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.drop = nn.Dropout(cfg.dropout_rate)

    def position_biases(self, q_pos: Tensor, k_pos: Tensor, mask: Tensor | BlockMask) -> list[Tensor | FlexBias]:
        """One bias per block, computed once per table. q_pos (B|1, T), k_pos (B|1, K).
        mask: additive (B|1, 1, T|1, K) -> (B|1, H, T, K) Tensors, mask added (SDPA twin);
        a BlockMask -> FlexBias (positions then 0..T-1 / 0..K-1, FlexBias says why): the table
        itself without gradients, else one dense (H, T, K) bias whose gradient reaches the table."""
        shared = None
        out = []
        for blk in self.blocks:
            rb = blk.rel_bias
            if rb is not None:
                if isinstance(mask, Tensor):
                    shared = rb(q_pos, k_pos).to(mask.dtype) + mask
                elif torch.is_grad_enabled() and rb.weight.requires_grad:
                    shared = FlexBias(mask, dense=rb(q_pos, k_pos)[0])  # (1, H, T, K) -> (H, T, K)
                else:
                    shared = FlexBias(mask, rb.weight, rb.bidirectional, rb.max_distance)
            out.append(shared)
        return out

    def use_flex(self, *inputs: Tensor) -> bool:
        """attention.use_flex for this stack; inputs: the activations it attends over."""
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *self.parameters()))
        attn = self.blocks[0].attn
        return use_flex(inputs[0], attn.d, attn.dropout if self.training else 0.0, grad)


class Encoder(Stack):
    def __init__(self, cfg: T5Config):
        super().__init__(cfg, EncoderBlock, cfg.num_layers)
        self.long = cfg.model_type == "longt5"

    def forward(self, x: Tensor, attention_mask: Tensor | None = None, segment_ids: Tensor | None = None) -> Tensor:
        """x (B, S, C) embedded input; attention_mask (B, S) 1 = token; segment_ids (B, S) packed
        example ids, 0 = padding, attention never crosses segments. -> (B, S, C) post-norm."""
        s = x.shape[1]
        if self.long:  # LongT5: one longt5.LongBias serves every block
            from .longt5 import stack_bias  # imported here: longt5.py builds on this module
            biases = [stack_bias(self, x, attention_mask, segment_ids)] * len(self.blocks)
        else:
            if segment_ids is not None:
                keep = Keep(s, s, keep_kv=segment_ids != 0, seg_q=segment_ids, seg_kv=segment_ids)
            else:
                keep = Keep(s, s, keep_kv=None if attention_mask is None else attention_mask.bool())
            pos = torch.arange(s, device=x.device)[None]  # (1, S)
            if self.use_flex(x):
                biases = self.position_biases(pos, pos, keep.block_mask(x.device))
            else:
                if segment_ids is not None:
                    pos = segment_positions(segment_ids)  # (B, S)
                biases = self.position_biases(pos, pos, mask_bias(keep.dense(x.device), x.dtype))
        x = self.drop(x)
        for blk, bias in zip(self.blocks, biases):
            x = blk(x, bias)
        return self.drop(self.norm(x))


class Decoder(Stack):
    def __init__(self, cfg: T5Config):
        super().__init__(cfg, DecoderBlock, cfg.num_decoder_layers)

    def forward(self, x: Tensor, memory: Tensor | None = None, memory_mask: Tensor | None = None,
                attention_mask: Tensor | None = None, segment_ids: Tensor | None = None,
                memory_segment_ids: Tensor | None = None, cache: DecodeCache | None = None) -> Tensor:
        """x (B, T, C) embedded target; memory (B, S, C) encoder output (unused with a cache).
        -> (B, T, C) post-norm hidden states."""
        t = x.shape[1]
        if cache is not None:
            self_biases = cache.step_biases()
            cross_bias = cache.cross_bias
        else:
            s = memory.shape[1]
            if segment_ids is not None:
                keep = Keep(t, t, seg_q=segment_ids, seg_kv=segment_ids, causal=True)
                cross = Keep(t, s, keep_kv=None if memory_segment_ids is None else memory_segment_ids != 0,
                             seg_q=segment_ids, seg_kv=memory_segment_ids)
            else:
                keep = Keep(t, t, keep_kv=None if attention_mask is None else attention_mask.bool(), causal=True)
                cross = Keep(t, s, keep_kv=None if memory_mask is None else memory_mask.bool())
            pos = torch.arange(t, device=x.device)[None]  # (1, T)
            if self.use_flex(x, memory):
                self_biases = self.position_biases(pos, pos, keep.block_mask(x.device))
                cross_bias = FlexBias(cross.block_mask(x.device))  # no relative bias (HF PR #8518)
            else:
                if segment_ids is not None:
                    pos = segment_positions(segment_ids)  # (B, T)
                self_biases = self.position_biases(pos, pos, mask_bias(keep.dense(x.device), x.dtype))
                cross_bias = mask_bias(cross.dense(x.device), x.dtype)
        x = self.drop(x)
        for i, blk in enumerate(self.blocks):
            x = blk(x, self_biases[i], cross_bias, memory, cache, i)
        if cache is not None:
            cache.advance()
        return self.drop(self.norm(x))


class T5(nn.Module):
    """Encoder-decoder T5. `encode` alone serves as T5EncoderModel (e.g. diffusion text encoders).
    `from_pretrained`, `save_pretrained` and `generate` are bound in `t5kit/__init__.py` (they
    live in hf.py and generate.py, which import this module, not the other way round)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)  # one table for both stacks
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               segment_ids: Tensor | None = None) -> Tensor:
        """input_ids (B, S) -> (B, S, C). No sqrt(d_model) input scaling, no absolute positions."""
        return self.encoder(self.shared(input_ids), attention_mask, segment_ids)

    def decode(self, decoder_input_ids: Tensor, memory: Tensor | None = None, memory_mask: Tensor | None = None,
               **kw) -> Tensor:
        """decoder_input_ids (B, T) -> hidden (B, T, C); kw as Decoder.forward."""
        return self.decoder(self.shared(decoder_input_ids), memory, memory_mask, **kw)

    def logits(self, hidden: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, V). The d_model**-0.5 rescale belongs to tied v1.0 models only."""
        if self.config.scale_decoder_outputs:
            hidden = hidden * self.config.d_model ** -0.5
        return F.linear(hidden, self.shared.weight) if self.lm_head is None else self.lm_head(hidden)

    def new_cache(self, memory: Tensor, memory_mask: Tensor | None, max_len: int) -> DecodeCache:
        return DecodeCache(self.decoder, memory, memory_mask, max_len)

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor, attention_mask: Tensor | None = None,
                decoder_attention_mask: Tensor | None = None, segment_ids: Tensor | None = None,
                decoder_segment_ids: Tensor | None = None) -> Tensor:
        """-> logits (B, T, V). segment_ids / decoder_segment_ids: packed examples (data.py)."""
        memory = self.encode(input_ids, attention_mask, segment_ids)
        hidden = self.decode(decoder_input_ids, memory, attention_mask, attention_mask=decoder_attention_mask,
                             segment_ids=decoder_segment_ids, memory_segment_ids=segment_ids)
        return self.logits(hidden)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Mesh TF / t5x initialisation for training from scratch, every parameter in
        `named_parameters` order (see `init_parameter`)."""
        for name, p in self.named_parameters():
            self.init_parameter(name, p, generator)

    @torch.no_grad()
    def init_parameter(self, name: str, p: Tensor, generator: torch.Generator | None = None) -> None:
        """Fill parameter `name` (or a whole-shaped tensor standing for it: a sharded model is
        initialised one full tensor at a time, parallel.materialize) as Mesh TF / t5x do (HF
        T5PreTrainedModel._init_weights agrees): embedding std 1; q (C*D)^-0.5; k, v C^-0.5;
        o (H*D)^-0.5; wi C^-0.5; wo F^-0.5; relative bias C^-0.5; norms 1. Untied lm_head: C^-0.5,
        t5x's variance-scaling fan-in init of `logits_dense` (HF and nanoT5 use 1.0; see t5x#1477,
        HF PR #26441)."""
        c = self.config
        leaf = name.split(".")[-2]
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            return
        std = {"shared": 1.0, "lm_head": c.d_model ** -0.5, "rel_bias": c.d_model ** -0.5,
               "global_bias": c.d_model ** -0.5,  # LongT5's global-token bias table (HF _init_weights)
               "q": (c.d_model * c.d_kv) ** -0.5, "k": c.d_model ** -0.5, "v": c.d_model ** -0.5,
               "o": c.inner_dim ** -0.5, "wi": c.d_model ** -0.5, "wi_0": c.d_model ** -0.5,
               "wi_1": c.d_model ** -0.5, "wo": c.d_ff ** -0.5}[leaf]
        p.normal_(0.0, std, generator=generator)


class T5Encoder(nn.Module):
    """The encoder alone, as transformers' T5EncoderModel (the text encoder diffusion pipelines
    ship). It owns `shared` and `encoder` under T5's own names, so hf.KEY_MAP serves both, and never
    builds a decoder: its memory is the encoder's weights plus activations. `from_pretrained` and
    `save_pretrained` are bound in `t5kit/__init__.py`, as for T5."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Encoder(config)

    encode = T5.encode  # the same function as T5's (it needs only `shared` and `encoder`), not a twin

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, S), attention_mask (B, S) 1 = token -> (B, S, C), T5EncoderModel's
        last_hidden_state."""
        return self.encode(input_ids, attention_mask)


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """hidden (B, S, C), mask (B, S) 1 = token -> (B, C): the mean over each row's tokens, padding
    excluded (sentence-transformers' Pooling, mean mode), summed in fp32, in hidden's dtype.

    >>> import torch
    >>> mean_pool(torch.tensor([[[1.0], [3.0], [9.0]]]), torch.tensor([[1, 1, 0]])).tolist()
    [[2.0]]
    """
    m = mask[:, :, None].float()  # (B, S, 1)
    return ((hidden.float() * m).sum(1) / m.sum(1).clamp(min=1)).to(hidden.dtype)

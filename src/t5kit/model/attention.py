"""The attention kernels every full-sequence T5 attention goes through (issue 8): the encoder, the
decoder's teacher-forced pass and cross-attention.

Two paths, one call (`attend`):
- SDPA, the slow twin: a materialised additive bias (B|1, H|1, T, K) = relative bias + mask.
- FlexAttention (torch.nn.attention.flex_attention): the relative bias added in `score_mod`, the
  mask as a `BlockMask`, so fully masked (B, 128-query, 128-key) blocks are never computed.

Shape legend as model.py: B batch, H heads, T query length, K key length, D head size.

T5 has no 1/sqrt(D): it is folded into q's init (t5x layers.py), so both paths run with scale=1.0.

Which path runs is `use_flex` (by device, grad and shape); `T5KIT_ATTENTION=auto|sdpa|flex` or
`with attention.backend("sdpa"):` overrides it (tests force either path this way).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # imported lazily at run time: flex_attention pulls in the compiler stack
    from torch.nn.attention.flex_attention import BlockMask

MODES = ("auto", "sdpa", "flex")
_forced: str | None = None  # set by `backend(...)`; wins over the environment variable


def mask_bias(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean keep mask (B, T|1, K) -> additive bias (B, 1, T|1, K): 0 or finfo.min, as HF does
    ((1 - mask) * finfo.min; a large finite value, so fully masked rows give no NaN)."""
    return torch.zeros((), dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)[:, None]


def relative_position_bucket(rel: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """Bucket index for `rel = key_pos - query_pos` (HF T5Attention._relative_position_bucket, t5x
    layers.py). Exact below num_buckets/2 (or /4 bidirectional), log-spaced above, float32 log.
    Elementwise torch ops only, so it also runs inside FlexAttention's score_mod on 0-d indices.

    >>> relative_position_bucket(torch.tensor([-200, -20, -3, 0, 3, 20]), True, 32, 128).tolist()
    [15, 10, 3, 0, 19, 26]
    """
    bucket = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (rel > 0).long() * num_buckets  # keys after the query use the upper half
        n = rel.abs()
    else:
        n = (-rel).clamp(min=0)  # causal: only the past has distinct buckets
    max_exact = num_buckets // 2
    large = max_exact + (
        torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(n < max_exact, n, large)


def mode() -> str:
    """The forced path: `backend(...)` if active, else $T5KIT_ATTENTION, else "auto"."""
    m = _forced or os.environ.get("T5KIT_ATTENTION", "auto")
    if m not in MODES:
        raise ValueError(f"T5KIT_ATTENTION={m!r}: expected one of {', '.join(MODES)}")
    return m


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """`with backend("sdpa"):` / `"flex"` / `"auto"`: force the attention path inside the block."""
    global _forced
    if name not in MODES:
        raise ValueError(f"attention backend {name!r}: expected one of {', '.join(MODES)}")
    before, _forced = _forced, name
    try:
        yield
    finally:
        _forced = before


def use_flex(x: Tensor, head_dim: int, dropout_p: float, needs_grad: bool) -> bool:
    """Whether a stack's attentions run on FlexAttention. x: any activation of the stack.

    Where FlexAttention cannot run, SDPA does, whatever the mode:
    - dropout_p > 0: FlexAttention has no attention dropout;
    - CPU with gradients: torch 2.13's CPU FlexAttention raises NotImplementedError in backward;
    - D not a power of two >= 16: the Triton kernel's head-size tiles (the `odd-shape` test model
      has D = 5); SDPA serves such models on every device.
    In "auto" mode it also has to be faster: on CUDA it is (H100, b64 x 12 heads x 512, D 64, bf16:
    fwd+bwd 3.7 ms with a dense (H, T, K) bias vs 10.6 ms for SDPA with the materialised bias;
    fwd with the table looked up in score_mod 0.79 ms vs 5.2 ms). On CPU it is not enough
    faster to pay for its compiles (2 shared cores, fp32, b4 rows of S, 3S/4, S/2, S/4 tokens,
    medians of 5): one attention with the bias built from the table (benchmarks/attention.py),
    8 heads, SDPA vs flex table lookup: S 256 40 vs 23 ms, S 512 101 vs 52 ms (12 heads: 42 vs 27,
    143 vs 76 ms); but a whole t5-small encoder (model.encode) 1344 vs 1320 ms at S 128 and
    2428 vs 2228 ms at S 512, where the FFNs dominate, while each new shape or mask kind costs a
    4-10 s compile (gcc 12; CPU shapes are static, see _flex) and each block mask ~25 ms. So "auto"
    keeps CPU on SDPA; `T5KIT_ATTENTION=flex` serves long-input CPU inference at fixed shapes.
    """
    m = mode()
    if m == "sdpa" or dropout_p > 0 or (needs_grad and x.device.type == "cpu"):
        return False
    if head_dim < 16 or head_dim & (head_dim - 1):
        return False
    return m == "flex" or x.device.type == "cuda"


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class Keep:
    """Which keys each query may attend: the AND of the parts given. One rule, evaluated two ways:
    densely for the SDPA twin (`dense`) and per block for FlexAttention (`block_mask`).

    keep_kv (B, K) bool: padding (attention_mask, or segment id != 0); seg_q (B, T) and seg_kv
    (B, K): packed example ids, a query sees only keys of its own segment; causal: key <= query."""

    q_len: int
    kv_len: int
    keep_kv: Tensor | None = None
    seg_q: Tensor | None = None
    seg_kv: Tensor | None = None
    causal: bool = False

    def __post_init__(self):
        if (self.seg_q is None) != (self.seg_kv is None):
            raise ValueError("Keep: seg_q and seg_kv go together (query and key segment ids)")

    def _rule(self, b: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        """The keep rule on broadcastable index tensors; the signature of a FlexAttention mask_mod
        without the head (T5 masks are the same for every head)."""
        keep = torch.ones((), dtype=torch.bool, device=q.device)
        if self.causal:
            keep = keep & (kv <= q)
        if self.keep_kv is not None:
            keep = keep & self.keep_kv[b, kv]
        if self.seg_q is not None:
            keep = keep & (self.seg_q[b, q] == self.seg_kv[b, kv])
        return keep

    @property
    def batch(self) -> int | None:
        """Rows the rule depends on; None when it is the same for every row (causal alone)."""
        t = self.keep_kv if self.keep_kv is not None else self.seg_q
        return None if t is None else t.shape[0]

    def dense(self, device: torch.device) -> Tensor:
        """-> (B|1, T|1, K) bool, the SDPA twin's mask (T|1: padding alone is the same for every query)."""
        b = torch.arange(self.batch or 1, device=device)[:, None, None]  # (B|1, 1, 1)
        q = torch.arange(self.q_len, device=device)[None, :, None]  # (1, T, 1)
        kv = torch.arange(self.kv_len, device=device)[None, None, :]  # (1, 1, K)
        keep = self._rule(b, q, kv)
        return keep.expand(torch.broadcast_shapes(keep.shape, (1, 1, self.kv_len)))

    def block_mask(self, device: torch.device) -> BlockMask:
        """-> BlockMask over (B|1, 1, T, K) in 128 x 128 blocks. Blocks with no kept entry are
        skipped by the kernel; blocks kept entirely skip the mask_mod too (create_block_mask's
        full blocks, PyTorch FlexAttention docs, "BlockMask")."""
        from torch.nn.attention.flex_attention import create_block_mask
        rule = self._rule

        def mask_mod(b, h, q_idx, kv_idx):
            return rule(b, q_idx, kv_idx)
        return create_block_mask(mask_mod, self.batch, None, self.q_len, self.kv_len, device=device)


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class FlexBias:
    """What FlexAttention adds to the scores of one attention, in place of a dense (B, H, T, K) bias.

    block_mask: the stack's Keep as blocks (shared by every layer of the stack).
    One of, or neither (cross-attention has no relative bias, HF PR #8518):
    - table (buckets, H) with bidirectional / max_distance: looked up inside score_mod with
      bucket(kv_idx - q_idx). Inference: nothing (B, H, T, K) or (H, T, K) is ever built. The
      table may be a DTensor split by head (tensor parallelism, training/parallel.py): score_mod
      reads its local shard, see `local_heads`.
    - dense (H, T, K): built once per stack from the table, read in score_mod. Training: its gradient
      reaches the table through the embedding lookup that built it. (The table lookup inside
      score_mod also has a gradient, but its backward scatters into buckets x H cells with
      atomics: 126 ms vs 3.7 ms on an H100 at b64 x 12 x 512.)
    Packed rows need no per-row bias: within a segment, key_pos - query_pos = kv_idx - q_idx, and
    across segments the block mask drops the score."""

    block_mask: BlockMask
    table: Tensor | None = None
    bidirectional: bool = True
    max_distance: int = 128
    dense: Tensor | None = None

    def __post_init__(self):
        if self.table is not None and self.dense is not None:
            raise ValueError("FlexBias: give the bias table or a dense bias, not both")

    def score_mod(self, heads: int) -> Callable | None:
        """The score_mod of an attention over `heads` heads (q's dim 1: under tensor parallelism,
        this rank's share), whose h indexes the bias's heads."""
        if self.dense is not None:
            dense = self.dense
            _check_heads("dense bias (H, T, K)", dense.shape[0], heads)

            def add_dense(score, b, h, q_idx, kv_idx):
                return score + dense[h, q_idx, kv_idx]
            return add_dense
        if self.table is not None:
            table, bidirectional, max_distance = local_heads(self.table), self.bidirectional, self.max_distance
            _check_heads("bias table (buckets, H)", table.shape[1], heads)
            num_buckets = table.shape[0]

            def add_bucket(score, b, h, q_idx, kv_idx):
                bucket = relative_position_bucket(kv_idx - q_idx, bidirectional, num_buckets, max_distance)
                return score + table[bucket, h]
            return add_bucket
        return None


def local_heads(table: Tensor) -> Tensor:
    """The (buckets, H) bias table as the heads this process attends over. Tensor parallelism
    (training/parallel.py) keeps the table a DTensor split by head (Shard(1)) while q / k / v are
    plain tensors of this rank's heads, so score_mod's h is a local index: it must read the local
    shard, not the global table (a DTensor inside flex_attention fails to trace: "FakeTensorMode
    should not be set when dispatching flex_attention", issue 17). A plain table is returned as is."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor
        if isinstance(table, DTensor):
            return table.to_local()
    return table


def _check_heads(what: str, got: int, heads: int) -> None:
    if got != heads:
        raise ValueError(f"FlexBias: the {what} has {got} heads, the attention {heads} (a bias and its "
                         "attention must hold the same heads: the local share under tensor parallelism)")


_compiled_flex: dict[str, Callable] = {}  # device type -> compiled flex_attention


def _flex(device: torch.device) -> Callable:
    """flex_attention compiled once per process and device type (lazily: importing t5kit compiles
    nothing). Eager flex_attention is a reference that materialises the scores (PyTorch warns:
    "use torch.compile(flex_attention)"); compiled, it is a fused kernel (Triton on CUDA, C++ on
    CPU). Recompiles follow new score_mod / mask kinds and shapes. On CUDA dynamo's automatic
    dynamic shapes make a dimension dynamic once it has changed; on CPU shapes stay static
    (dynamic=False): torch 2.13's C++ flex template fails to compile with a dynamic length
    ("'cur_kvSplitSize8' was not declared", met in this module's tests), so there each new
    (B, T, K) compiles anew: pad CPU inputs to a few lengths.
    A model has up to ~10 kinds (encoder / decoder self / cross x padding / packing / causal x
    table / dense bias), each compiled static then dynamic, past dynamo's default of 8 graphs per
    function, after which it silently runs eager flex (materialised scores). Hence the limit of 64,
    raised for this function's calls only."""
    kind = device.type
    if kind not in _compiled_flex:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention
        compiled = torch.compile(flex_attention, dynamic=False if kind == "cpu" else None)
        _compiled_flex[kind] = torch._dynamo.config.patch(recompile_limit=64)(compiled)
    return _compiled_flex[kind]


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | FlexBias, dropout_p: float = 0.0) -> Tensor:
    """q (B, H, T, D), k / v (B, H, K, D) -> (B, H, T, D), softmax(q k^T + bias) v with scale 1.

    bias: a dense additive Tensor (B|1, H|1, T, K) -> SDPA (the slow twin); a FlexBias ->
    FlexAttention. dropout_p: attention dropout, already 0 outside training (SDPA only).

    Fully masked query rows (only padding queries: encoder rows with segment id 0, decoder rows in
    cross-attention to packed memory) differ: SDPA's finfo.min mask gives a uniform average of the
    values, FlexAttention gives 0. Neither reaches a loss or a kept output."""
    if isinstance(bias, Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0, dropout_p=dropout_p)
    if dropout_p > 0:
        raise ValueError(f"FlexAttention has no attention dropout (dropout_p={dropout_p}); use_flex should "
                         "have chosen SDPA")
    flex, score_mod = _flex(q.device), bias.score_mod(q.shape[1])
    if torch.compiler.is_compiling():  # traced inside a compiled model: dynamo inlines the compiled call
        return flex(q, k, v, score_mod=score_mod, block_mask=bias.block_mask, scale=1.0)
    # Outside a compiled region the fused kernel runs whatever the caller's stance: training/loop.py
    # evaluates a --compile run under set_stance("force_eager") (its graphs are the training step's),
    # which would otherwise run flex_attention's eager reference, materialising the (B, H, T, K)
    # scores (issue 17). set_stance nests as a context manager and restores the caller's stance on
    # exit; it may not be entered while dynamo traces (torch.compiler.set_stance docs), hence the test.
    with torch.compiler.set_stance("default"):
        return flex(q, k, v, score_mod=score_mod, block_mask=bias.block_mask, scale=1.0)

"""torchrun and the parallel layouts, applied to a built model from outside (DESIGN principle 3).

A run is `world` processes on a 2-D device mesh (data x tensor), `dp` x `tp`. Ranks of one tensor
group hold the same batch and a share of every layer (Megatron's layout); data-parallel ranks hold
different batches and either whole replicas (DDP) or a shard of every parameter (FSDP2). Order of
application follows torchtitan's `parallelize.py`: tensor parallelism, then activation
checkpointing, then torch.compile, then FSDP / DDP. Every helper degrades to the identity in a
single process.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

PARALLEL = ("ddp", "fsdp")
COMPILE = ("none", "block", "model")

# The data-parallel process group of this run: reductions of losses and token counts, data-state
# gathering. None when not distributed; the whole world when tp == 1.
_dp_group = None
_tp_active = False  # tensor parallelism in this run: losses run under `vocab_parallel`
# The attribute under which checkpoint_wrapper holds a block (--recompute-activations); it also
# prefixes the wrapped parameters' names.
_WRAPPED = "_checkpoint_wrapped_module"


@dataclass(frozen=True)
class Layout:
    """Where this process sits. rank / world over all processes; tp ranks share a batch."""
    rank: int = 0
    world: int = 1
    tp: int = 1
    device: str = "cpu"
    mesh: object = None  # DeviceMesh ("dp", "tp") when world > 1

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp


def init(device: str, tp: int = 1) -> Layout:
    """The process group from torchrun's environment (NCCL on CUDA, gloo on CPU; each rank on
    cuda:LOCAL_RANK) and the (dp, tp) mesh. Sizes are checked before any collective, alike on
    every rank, so a bad layout stops every rank with the same message instead of hanging."""
    global _dp_group, _tp_active
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or tp > world or world % tp:
        raise ValueError(f"--tensor-model-parallel-size {tp}: expected a divisor of the world size {world} "
                         f"(launch tp x data-parallel processes with torchrun --nproc-per-node)")
    if world == 1:
        return Layout(device=device)
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(torch.device(device).type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    _dp_group, _tp_active = mesh.get_group("dp"), tp > 1
    return Layout(dist.get_rank(), world, tp, device, mesh)


def check(model: nn.Module, layout: Layout, how: str, compile: str = "none") -> None:
    """Refuse layouts the model or the chosen data parallelism cannot take (same on every rank)."""
    if how not in PARALLEL:
        raise ValueError(f"--parallel {how!r}: expected one of {', '.join(PARALLEL)}")
    if compile not in COMPILE:
        raise ValueError(f"--compile {compile!r}: expected one of {', '.join(COMPILE)}")
    if how == "fsdp" and layout.world > 1 and compile == "model":
        raise ValueError("--compile model with --parallel fsdp: FSDP2's hooks would sit inside one whole-model "
                         "graph; use --compile block (each block compiled, then sharded, as torchtitan does)")
    c = model.config
    for name, size in (("--num-attention-heads", c.num_heads), ("--ffn-hidden-size", c.d_ff),
                       ("the vocabulary", c.vocab_size)):
        if size % layout.tp:
            raise ValueError(f"--tensor-model-parallel-size {layout.tp} does not divide {name} ({size}): "
                             f"each tensor-parallel rank holds an equal share")
    if how == "ddp" and layout.tp > 1 and layout.dp > 1:
        raise ValueError(f"--tensor-model-parallel-size {layout.tp} with {layout.dp} data-parallel groups needs "
                         f"--parallel fsdp (FSDP2 over the data dimension of the 2-D mesh)")


def apply(model: nn.Module, layout: Layout, how: str = "ddp", bf16: bool = False,
          recompute: bool = False, compile: str = "none") -> nn.Module:
    """Parallelise a built model in place; -> the module to call for training (a DDP wrapper, or
    the model itself). The model keeps its parameter names, so checkpoints and exports see the
    same keys whatever the layout. The model may be on the CPU (an HF checkpoint, memory-mapped)
    or on the meta device (materialised once split and sharded, from the current RNG state); it is
    moved to the layout's device here, after sharding, and before DDP broadcasts its weights."""
    check(model, layout, how, compile)
    on_meta = any(p.is_meta for p in model.parameters())
    if layout.tp > 1:
        tensor_parallel(model, layout.mesh["tp"])
    if recompute:
        recompute_blocks(model)
    compile_model(model, compile)
    if how == "fsdp" and layout.world > 1:  # on a (1, tp) mesh too: the same 2-D parameters as at any dp size
        fully_shard_model(model, layout.mesh["dp"], bf16)
    if on_meta:
        materialize(model, layout.device)
    else:  # FSDP moved each unit as it sharded it: one unit's whole weights on the device at a time
        model.to(layout.device)
    if how == "fsdp" or layout.dp == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    dev = torch.device(layout.device)
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def tensor_parallel(model: nn.Module, mesh) -> None:
    """Megatron's layout through DTensor: q / k / v and wi column-wise, o and wo row-wise (one
    all-reduce per attention and per FFN), heads and the relative-bias table split by head; the
    token embedding split by vocabulary (an all-reduce after the lookup) and the LM head by
    vocabulary too, its logits left sharded for the vocabulary-parallel cross-entropy
    (`vocab_parallel`)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleOutput,
        RowwiseParallel,
        parallelize_module,
    )
    for stack in (model.encoder, model.decoder):
        for blk in stack.blocks:
            attns = [n for n in ("attn", "cross") if hasattr(blk, n)]
            plan = {f"{a}.{p}": ColwiseParallel() for a in attns for p in "qkv"}
            plan.update({f"{a}.o": RowwiseParallel() for a in attns})
            plan.update({f"ffn.{n}": ColwiseParallel() for n in ("wi", "wi_0", "wi_1") if hasattr(blk.ffn, n)})
            plan["ffn.wo"] = RowwiseParallel()
            parallelize_module(blk, mesh, plan)
            if blk.rel_bias is not None:
                _shard_bias_by_head(blk.rel_bias, mesh)
    plan = {"shared": RowwiseParallel(input_layouts=Replicate())}
    if model.lm_head is not None:
        plan["lm_head"] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False)
    else:  # tied (v1.0): logits = hidden @ shared.weight.T, the table already split by vocabulary
        plan["decoder"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Replicate(),
                                              use_local_output=False)
    parallelize_module(model, mesh, plan)


def _shard_bias_by_head(module: nn.Module, mesh) -> None:
    """RelativeBias: its (buckets, H) table split by head; positions enter replicated, the bias
    leaves as this rank's heads, (B, H / tp, T, K), a plain tensor like the attention's heads.
    FlexAttention without gradients reads the table itself inside score_mod, not through this
    forward: it takes the local shard there (attention.local_heads)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor

    def partition(name, mod, mesh):
        mod.register_parameter("weight", nn.Parameter(distribute_tensor(mod.weight, mesh, [Shard(1)])))

    def inputs(mod, args, mesh):
        return tuple(DTensor.from_local(a, mesh, [Replicate()], run_check=False) for a in args)

    distribute_module(module, mesh, partition, input_fn=inputs, output_fn=lambda mod, out, mesh: out.to_local())


def materialize(model: nn.Module, device: str) -> None:
    """Real storage for a model built on the meta device and parallelised, initialised exactly as
    the whole model is by `model.init_weights()` from the same RNG state: for each parameter in
    order, a full tensor is drawn on the CPU (`model.init_parameter`) and this rank's shard copied
    from it. No rank ever holds more than one full tensor beside its shards (DESIGN principle 3:
    a model too big for one device is built on the meta device)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = torch.empty(p.shape)  # drawn in fp32 as init_weights does, then cast by the copy
            model.init_parameter(name.replace(_WRAPPED + ".", ""), full)
            if isinstance(p, DTensor):  # every rank drew the same tensor: take the shard, no communication
                p.to_local().copy_(distribute_tensor(full.to(device), p.device_mesh, p.placements,
                                                     src_data_rank=None).to_local())
            else:
                p.copy_(full)


def recompute_blocks(model: nn.Module) -> None:
    """Activation checkpointing per block (Megatron's --recompute-activations, torchtitan's
    "full" mode): a block keeps its input only and reruns its forward in backward, with the RNG
    state replayed, so dropout masks and losses are unchanged. State-dict keys stay the same (the
    wrapper strips its prefix)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    for stack in (model.encoder, model.decoder):
        for i, blk in enumerate(stack.blocks):
            stack.blocks[i] = checkpoint_wrapper(blk)


def compile_model(model: nn.Module, how: str) -> None:
    """torch.compile from outside, in place (`Module.compile`: parameter names unchanged).
    block: every encoder and decoder block (under --recompute-activations, its checkpoint wrapper)
    and each stack's final norm, one graph per block class, reused by every block of it
    (torchtitan's per-block compile); RMSNorm, the gated GELU and the residual adds fuse into the
    matmuls' neighbours. model: the whole forward, embedding to logits, one graph. Compilation
    happens at the first call (the loop reports that step's time)."""
    if how == "model":
        model.compile()
    elif how == "block":
        for stack in (model.encoder, model.decoder):
            for blk in stack.blocks:
                blk.compile()
            stack.norm.compile()


def fully_shard_model(model: nn.Module, mesh, bf16: bool) -> None:
    """FSDP2: the layers of each encoder and decoder block one unit (their parameters gathered
    just before use and freed after), then the root: embedding, final norms, LM head and the
    relative-bias tables, which the stack reads before any block runs. Under bf16, parameters are
    gathered in bf16 and gradients reduced in fp32 over fp32 master shards."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for stack in (model.encoder, model.decoder):
        for blk in stack.blocks:
            blk = getattr(blk, _WRAPPED, blk)  # under --recompute-activations
            fully_shard([m for name, m in blk.named_children() if name != "rel_bias"], mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Every FSDP unit's parameters gathered whole for the duration, and kept so (generation
    calls layers' methods outside their forward, where FSDP2 would not gather them); nothing to
    do without FSDP. Costs the whole model's memory on each rank while it lasts."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def sync_gradients(module: nn.Module, sync: bool):
    """Context for one micro-batch's backward. DDP all-reduces on the last micro-batch only (its
    gradients are whole anyway). FSDP2 reduce-scatters after every micro-batch, as torchtitan does:
    skipping it would keep every unit's gradients unsharded in fp32 until the last micro-batch
    (4 bytes per parameter per rank, 45 GB for t5-11b), the memory FSDP exists to save."""
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def clip_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """The global gradient norm over every parameter, whatever its sharding, clipped to max_norm
    (inf: measure only); -> a 0-d tensor on the device (reading it is a host sync, left to
    logging). Gradients are grouped by mesh and placement: a group of DTensors gives a partial
    norm that `full_tensor()` completes (torchtitan `clip_grad_norm_`); replicated plain tensors
    count once."""
    from torch.distributed.tensor import DTensor
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p)
    norms = []
    for group in groups.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    if max_norm != float("inf"):
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def vocab_parallel():
    """Context for a loss over logits split by vocabulary (tensor parallelism), around the forward
    and the backward alike: cross-entropy over the shards without gathering them (DTensor
    `loss_parallel`). Plain tensors are unaffected, so it is entered for every step of a run."""
    if _tp_active:
        from torch.distributed.tensor.parallel import loss_parallel
        return loss_parallel()
    return contextlib.nullcontext()


def local(x: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor's value as a plain tensor (others pass through)."""
    from torch.distributed.tensor import DTensor
    return x.full_tensor() if isinstance(x, DTensor) else x


# ---- reductions and rank queries ----

def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    return not active() or dist.get_rank() == 0


def rank() -> int:
    return dist.get_rank() if active() else 0


def sum_all(*values: float) -> list[float]:
    """Sum each value over the data-parallel ranks (tensor-parallel ranks hold the same batch)."""
    if not active():
        return list(values)
    # NCCL reduces device tensors only
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, group=_dp_group)
    return t.tolist()


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the data-parallel ranks in place, on its device: no host read (NCCL takes
    device tensors, gloo CPU ones)."""
    if active():
        dist.all_reduce(t, group=_dp_group)
    return t


def gather(obj, data_parallel: bool = True) -> list:
    """Every data-parallel rank's `obj` in rank order (all ranks' with data_parallel=False), on
    every rank."""
    if not active():
        return [obj]
    group = _dp_group if data_parallel else None
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    global _dp_group, _tp_active
    if active():
        dist.destroy_process_group()
    _dp_group, _tp_active = None, False

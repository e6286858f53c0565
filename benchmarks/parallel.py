"""Memory and speed per rank of the parallel layouts against model size: one process, DDP and
FSDP2 over `--ranks` processes (torchrun, gloo on CPU / NCCL on CUDA), optionally tensor
parallelism. Each case trains `--steps` steps of random span-corruption-shaped batches with
t5kit's own loop pieces (parallel.apply, loss_terms, AdamW) and reports, per rank:

- state_mib: what the rank holds between steps, counted from the tensors themselves: its shard
  of the parameters, of the gradients and of the AdamW moments (exact, device-independent);
- saved_activation_mib: the bytes autograd keeps for backward in one forward (saved-tensor hooks,
  parameters excluded): activations, exact, the same on any device for the same dtype;
- peak_rss_mib / base_rss_mib: the process' peak resident memory and its resident memory before
  the model was built (CPU: the difference is what training added, activations included);
- peak_gpu_mib: torch.cuda.max_memory_allocated (CUDA only);
- step_s: the median step time and tokens_per_s (inputs + targets over all data-parallel ranks).

    python benchmarks/parallel.py --shapes tiny t5-small t5-base --layouts single ddp fsdp
    python benchmarks/parallel.py --device cuda --ranks 8 --shapes t5-v1_1-large --layouts ddp fsdp --bf16

One JSON line per (shape, layout).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

LAYOUTS = {"single": ("ddp", 1), "ddp": ("ddp", 1), "fsdp": ("fsdp", 1), "tp2": ("ddp", 2), "fsdp_tp2": ("fsdp", 2)}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors if t is not None)


def worker(args) -> None:
    """One rank of one case (run under torchrun, or alone for `single`)."""
    import torch

    from t5kit.model.config import get_preset
    from t5kit.model.t5 import T5
    from t5kit.training import parallel
    from t5kit.training.loop import _autocast
    from t5kit.training.loss import loss_terms
    from t5kit.training.optim import OptimConfig, build_optimizer

    torch.set_num_threads(args.threads)
    base = _rss_mib()
    how, tp = LAYOUTS[args.layout]
    layout = parallel.init(args.device, tp)
    cfg = get_preset(args.shape).replace(dropout_rate=0.0)
    if args.layers is not None:  # fewer blocks of the same shape: per-block figures of models too big to run here
        cfg = cfg.replace(num_layers=args.layers, num_decoder_layers=args.layers)
    with torch.device("meta"):  # as `t5kit pretrain` builds it: initialised shard by shard by apply
        model = T5(cfg)
    torch.manual_seed(0)
    net = parallel.apply(model, layout, how, args.bf16, args.recompute)
    opt = build_optimizer(model, OptimConfig())
    gen = torch.Generator().manual_seed(layout.dp_rank)
    ids = torch.randint(3, cfg.vocab_size, (args.micro_batch, args.inputs), generator=gen)
    labels = torch.randint(3, cfg.vocab_size, (args.micro_batch, args.targets), generator=gen)
    dec = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1]], 1)
    batch = {k: v.to(layout.device) for k, v in {"input_ids": ids, "decoder_input_ids": dec, "labels": labels}.items()}
    times, saved = [], {}

    def keep(t):  # the tensors autograd keeps for backward, parameters left out, each storage once
        if not (t.is_leaf and t.requires_grad):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for i in range(args.steps):
        t = time.perf_counter()
        counting = torch.autograd.graph.saved_tensors_hooks(keep, lambda x: x) if i == 0 else contextlib.nullcontext()
        with _autocast(layout.device, args.bf16), parallel.vocab_parallel():
            with counting:
                loss, n, _ = loss_terms(net, batch)
            (loss / n).backward()
        parallel.clip_grad_norm(list(model.parameters()), 1.0)
        opt.step()
        if layout.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        if i < args.steps - 1:  # the last step keeps its gradients: they are counted below
            opt.zero_grad(set_to_none=True)
    params = list(model.parameters())
    moments = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()]
    row = {"rank": layout.rank, "base_rss_mib": round(base, 1), "peak_rss_mib": round(_rss_mib(), 1),
           "state_mib": round((_local_bytes(params) + _local_bytes(p.grad for p in params)
                               + _local_bytes(moments)) / 2**20, 1),
           "saved_activation_mib": round(sum(saved.values()) / 2**20, 1),
           "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
           "tokens": args.micro_batch * (args.inputs + args.targets) * layout.dp}
    if layout.device.startswith("cuda"):
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    rows = parallel.gather(row, data_parallel=False)
    if layout.rank == 0:
        with open(args.out, "w") as f:
            json.dump(rows, f)
    parallel.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["tiny", "t5-small", "t5-base"])
    ap.add_argument("--layouts", nargs="+", default=["single", "ddp", "fsdp"], choices=sorted(LAYOUTS))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--recompute", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--inputs", type=int, default=128)
    ap.add_argument("--targets", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--layers", type=int, help="encoder and decoder blocks (default: the shape's)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--layout", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    common = ["--device", args.device, "--micro-batch", str(args.micro_batch), "--inputs", str(args.inputs),
              "--targets", str(args.targets), "--steps", str(args.steps), "--threads", str(args.threads),
              *(["--layers", str(args.layers)] if args.layers is not None else []),
              *(["--bf16"] if args.bf16 else []), *(["--recompute"] if args.recompute else [])]
    for shape in args.shapes:
        for layout in args.layouts:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "rows.json")
                me = [os.path.abspath(__file__), "--worker", "--shape", shape, "--layout", layout, "--out", out, *common]
                ranks = 1 if layout == "single" else args.ranks
                launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                               "--standalone", "--nproc-per-node", str(ranks)]
                res = subprocess.run([*launch, *me], capture_output=True, text=True)
                if res.returncode:
                    print(json.dumps({"bench": "parallel", "shape": shape, "layout": layout,
                                      "error": res.stderr[-2000:]}), flush=True)
                    continue
                rows = json.load(open(out))
            from t5kit.model.config import get_preset
            step = max(r["step_s"] for r in rows)
            cfg = get_preset(shape)
            if args.layers is not None:
                cfg = cfg.replace(num_layers=args.layers, num_decoder_layers=args.layers)
            print(json.dumps({
                "bench": "parallel", "shape": shape, "layers": cfg.num_layers, "params_m": round(cfg.num_params() / 1e6, 1),
                "layout": layout, "ranks": ranks, "device": args.device, "bf16": args.bf16,
                "recompute": args.recompute, "micro_batch": args.micro_batch, "inputs": args.inputs,
                "targets": args.targets, "state_mib_per_rank": [r["state_mib"] for r in rows],
                "saved_activation_mib_per_rank": [r["saved_activation_mib"] for r in rows],
                "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in rows],
                "base_rss_mib_per_rank": [r["base_rss_mib"] for r in rows],
                **({"peak_gpu_mib_per_rank": [r["peak_gpu_mib"] for r in rows]} if "peak_gpu_mib" in rows[0] else {}),
                "step_s": round(step, 4), "tokens_per_s": round(rows[0]["tokens"] / step, 1)}), flush=True)


if __name__ == "__main__":
    main()

"""One encoder self-attention with T5's relative bias and a padded batch, three ways (issue 8):

  sdpa        SDPA with the materialised (B, H, S, S) bias = relative bias + padding mask (the twin)
  flex_dense  FlexAttention reading a dense (H, S, S) bias in score_mod, padding as a block mask
  flex_table  FlexAttention looking the (buckets, H) table up in score_mod (inference)

Each step builds its bias from the table (so fwd+bwd gradients reach the table), as the model does
once per stack; the block mask is built once per batch and timed on its own (`mask_ms`). Prints one
JSON line per (shape, case, pass) with the median over --repeats; flex compiles are timed apart
(`compile_s`, the first call). Row lengths are S, 3S/4, S/2, S/4 repeated.

    python benchmarks/attention.py --device cuda --dtype bfloat16 --batch 64 --heads 12 --lengths 512
    python benchmarks/attention.py --device cpu --threads 2 --batch 4 --heads 8 12 --lengths 128 256 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--heads", type=int, nargs="+", default=[12])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512])
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--cases", nargs="+", default=["sdpa", "flex_dense", "flex_table"],
                    choices=["sdpa", "flex_dense", "flex_table"])
    ap.add_argument("--backward", action=argparse.BooleanOptionalAction, default=None,
                    help="also time fwd+bwd (default: on CUDA; CPU FlexAttention has no backward)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from t5kit.model.attention import FlexBias, Keep, attend, relative_position_bucket
    from t5kit.model.attention import mask_bias
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    passes = ["fwd"] + (["fwd+bwd"] if (args.device == "cuda" if args.backward is None else args.backward) else [])
    gen = torch.Generator().manual_seed(0)
    for h in args.heads:
        for s in args.lengths:
            b, d = args.batch, args.head_dim
            q, k, v = (torch.randn(b, h, s, d, generator=gen).to(dev, dtype) for _ in range(3))  # (B, H, S, D)
            table = (torch.randn(32, h, generator=gen) * 0.5).to(dev, dtype)  # (buckets, H)
            lengths = torch.tensor([s, 3 * s // 4, s // 2, s // 4] * b)[:b].to(dev)
            keep = Keep(s, s, keep_kv=torch.arange(s, device=dev)[None] < lengths[:, None])  # (B, S) padding
            pos = torch.arange(s, device=dev)
            buckets = relative_position_bucket(pos[None] - pos[:, None], True, 32, 128)  # (S, S)
            pad = mask_bias(keep.dense(dev), dtype)  # (B, 1, 1, S)
            mask_ms = statistics.median(timed(lambda: keep.block_mask(dev), args.device) for _ in range(3)) * 1e3
            bm = keep.block_mask(dev)

            def step(case: str, grad: bool):
                qq, tt = (q.requires_grad_(grad), table.requires_grad_(grad))
                with torch.set_grad_enabled(grad):
                    if case == "sdpa":
                        bias = tt[buckets].permute(2, 0, 1)[None] + pad  # (1, H, S, S) + (B, 1, 1, S)
                    elif case == "flex_dense":
                        bias = FlexBias(bm, dense=tt[buckets].permute(2, 0, 1))  # (S, S, H) -> (H, S, S)
                    else:
                        bias = FlexBias(bm, tt, bidirectional=True, max_distance=128)
                    out = attend(qq, k, v, bias)
                    if grad:
                        out.float().sum().backward()
                        qq.grad = tt.grad = None

            for case in args.cases:
                for p in passes:
                    grad = p == "fwd+bwd"
                    if grad and case == "flex_table":
                        continue  # its backward scatters with atomics into buckets x H cells: 126 ms on H100
                    compile_s = timed(lambda: step(case, grad), args.device) if case != "sdpa" else 0.0
                    step(case, grad)
                    ms = statistics.median(timed(lambda: step(case, grad), args.device) for _ in range(args.repeats))
                    print(json.dumps({"bench": "attention", "device": args.device, "dtype": args.dtype, "batch": b,
                                      "heads": h, "len": s, "head_dim": d, "case": case, "pass": p,
                                      "ms": round(ms * 1e3, 3), "compile_s": round(compile_s, 2),
                                      "mask_ms": round(mask_ms, 2) if case != "sdpa" else None}), flush=True)


if __name__ == "__main__":
    main()

"""Encoder tokens/s: t5kit.T5Encoder vs transformers' T5EncoderModel, side by side and interleaved,
on random full checkpoints of published shapes (T5Encoder skips the decoder; so does
T5EncoderModel). Achieved TFLOP/s count the matmuls only (projections, QK^T, AV, FFN); on CUDA
also % of --peak-tflops and each contender's peak GPU memory (load + one forward, measured alone)
next to the encoder's weight bytes. One JSON line per (shape, batch, length), medians of --repeats.

    python benchmarks/encode.py --device cpu --dtype fp32 --shapes t5-small --batch 4 --length 128
    python benchmarks/encode.py --device cuda --dtype bf16 --shapes t5-v1_1-xl --batch 32 --length 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def encoder_flops(cfg, batch: int, length: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one encoder forward over batch x length tokens:
    per layer q, k, v, o (C x H*D each), QK^T and AV (S x S x H*D each), and the FFN (2 or 3
    C x F matrices). The embedding lookup, norms and softmax are not matmuls and not counted."""
    n = batch * length
    proj = 4 * n * cfg.d_model * cfg.inner_dim
    attn = 2 * batch * length * length * cfg.inner_dim
    ffn = (3 if cfg.is_gated else 2) * n * cfg.d_model * cfg.d_ff
    return 2 * cfg.num_layers * (proj + attn + ffn)


def build(shape: str, folder: str, encoder_only: bool = False):
    """A random full T5 of the preset's shape (or its encoder alone, as diffusion pipelines ship T5
    text encoders: half the bytes to build and write), saved by transformers -> its config (t5kit).
    Both contenders load the encoder alone either way."""
    import transformers

    import t5kit
    cfg = t5kit.get_preset(shape)
    torch.manual_seed(0)
    hf_cfg = (transformers.T5Config if cfg.model_type == "t5" else transformers.MT5Config)(**cfg.to_hf_json())
    cls = transformers.T5EncoderModel if encoder_only else transformers.T5ForConditionalGeneration
    cls(hf_cfg).save_pretrained(folder)
    return cfg


def load(which: str, folder: str, device: str, dtype: torch.dtype):
    """-> a callable (ids, mask) -> (B, S, C) hidden states, the model loaded onto `device`."""
    if which == "t5kit":  # as `t5kit embed` loads it: on CPU, oneDNN-packed weights
        import t5kit
        model = t5kit.for_inference(t5kit.T5Encoder.from_pretrained(folder, dtype=dtype, device=device))
        return lambda ids, mask: model(ids, mask)
    import transformers
    model = transformers.T5EncoderModel.from_pretrained(folder, dtype=dtype).to(device).eval()
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).last_hidden_state


def peak_memory_mb(which: str, folder: str, device: str, dtype: torch.dtype, ids, mask) -> float:
    """Peak GPU memory of loading `which` and one forward, with nothing else resident."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run = load(which, folder, device, dtype)
    with torch.inference_mode():
        run(ids, mask)
    peak = torch.cuda.max_memory_allocated() - base
    del run
    torch.cuda.empty_cache()
    return round(peak / 2**20, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["t5-small", "t5-v1_1-base"])
    ap.add_argument("--batch", nargs="+", type=int, default=[4])
    ap.add_argument("--length", nargs="+", type=int, default=[128])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--encoder-only", action="store_true", help="build and save the random checkpoint's encoder "
                    "alone (the measured loads and forwards are the same)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense peak for --dtype "
                    "(989: H100 SXM bf16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import t5kit
    dtype, cuda = DTYPES[args.dtype], args.device == "cuda"

    def timed(run, ids, mask) -> float:
        with torch.inference_mode():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(ids, mask)
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - t0

    for shape in args.shapes:
        with tempfile.TemporaryDirectory() as folder:
            cfg = build(shape, folder, args.encoder_only)
            with torch.device("meta"):  # sizes only, nothing allocated
                n_params = sum(p.numel() for p in t5kit.T5Encoder(cfg).parameters())
            for batch in args.batch:
                for length in args.length:
                    gen = torch.Generator().manual_seed(1)
                    ids = torch.randint(3, cfg.vocab_size, (batch, length), generator=gen)
                    ids[:, -1] = 1
                    ids, mask = ids.to(args.device), torch.ones_like(ids).to(args.device)
                    row = {"bench": "encode", "shape": shape, "device": args.device, "dtype": args.dtype,
                           "batch": batch, "length": length, "checkpoint": "encoder" if args.encoder_only else "full"}
                    if cuda:
                        row["weights_mb"] = round(n_params * dtype.itemsize / 2**20, 1)
                        for which in ("t5kit", "transformers"):
                            row[f"{which}_peak_mem_mb"] = peak_memory_mb(which, folder, args.device, dtype, ids, mask)
                    runs = {which: load(which, folder, args.device, dtype) for which in ("t5kit", "transformers")}
                    times: dict[str, list[float]] = {which: [] for which in runs}
                    for which, run in runs.items():  # warm up (kernels chosen, caches filled)
                        timed(run, ids, mask)
                    for _ in range(args.repeats):  # interleaved: both see the same machine noise
                        for which, run in runs.items():
                            times[which].append(timed(run, ids, mask))
                    flops = encoder_flops(cfg, batch, length)
                    for which, ts in times.items():
                        t = statistics.median(ts)
                        row[f"{which}_tok_s"] = round(batch * length / t, 1)
                        row[f"{which}_tflops"] = round(flops / t / 1e12, 3)
                        if cuda:
                            row[f"{which}_pct_peak"] = round(100 * flops / t / 1e12 / args.peak_tflops, 1)
                    row["ratio"] = round(row["t5kit_tok_s"] / row["transformers_tok_s"], 2)
                    row["repeats"] = args.repeats
                    if not cuda:
                        row["threads"] = args.threads
                    print(json.dumps(row), flush=True)
                    del runs


if __name__ == "__main__":
    main()

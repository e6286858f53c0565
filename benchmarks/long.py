"""LongT5 encoder at long inputs: t5kit.T5Encoder vs transformers' LongT5EncoderModel, tokens/s
and peak memory, on a random checkpoint of google/long-t5-tglobal-base's shape (d_model 768, 12
heads x 64, d_ff 2048, 12 layers, local_radius 127, global blocks of 16, gated-gelu), built and
saved by transformers. One JSON line per length.

Speed: both contenders loaded in this process, timed alternately (side by side: both see the same
machine), --warmup untimed forwards each first; tokens/s of the median of --repeats, and the
process CPU seconds of that forward on CPU (every thread; on a shared machine the steadier figure).
Memory: each (length, contender) once more in a fresh process of its own, so each peak is its
own, after a 256-token forward has made the weights resident: on CPU the peak resident set
(Linux VmHWM, reset just before the forward by writing 5 to /proc/self/clear_refs: weights,
activations and all) and that peak over the resident set before the forward (the forward's own);
on CUDA torch.cuda.max_memory_allocated, likewise.

    python benchmarks/long.py --lengths 4096 8192 16384                 (CPU, fp32: issue 20's targets)
    python benchmarks/long.py --device cuda --dtype bf16 --lengths 16384
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(folder: str, preset: str, layers: int | None) -> None:
    """A random LongT5 encoder of the preset's shape, saved by transformers (LongT5EncoderModel)."""
    import transformers

    import t5kit
    cfg = t5kit.get_preset(preset)
    if layers:
        cfg = cfg.replace(num_layers=layers, num_decoder_layers=layers)
    torch.manual_seed(0)
    transformers.LongT5EncoderModel(transformers.LongT5Config(**cfg.to_hf_json(encoder_only=True))).save_pretrained(
        folder)


def _status_mb(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc/self/status (kB)."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _reset_peak_rss() -> None:
    """Start VmHWM afresh from the current resident set (Linux >= 4.0, proc(5) clear_refs)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def load(which: str, folder: str, device: str, dtype: str):
    """-> a callable (ids, mask) -> (B, S, C) hidden states, `which` loaded onto `device`."""
    if which == "t5kit":  # as `t5kit embed` loads it: on CPU, oneDNN-packed weights
        import t5kit
        return t5kit.for_inference(t5kit.T5Encoder.from_pretrained(folder, dtype=DTYPES[dtype], device=device))
    import transformers
    model = transformers.LongT5EncoderModel.from_pretrained(folder, dtype=DTYPES[dtype]).to(device).eval()
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).last_hidden_state


def inputs(length: int, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32000, (batch, length), generator=gen)
    ids[:, -1] = 1
    return ids.to(device), torch.ones_like(ids).to(device)


def timed(run, ids, mask, cuda: bool) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward."""
    with torch.inference_mode():
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        run(ids, mask)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu


def peak_memory(which: str, folder: str, length: int, batch: int, device: str, dtype: str) -> dict:
    """In this (fresh) process: load, one forward -> {"peak_mb", "forward_mb"}."""
    run, cuda = load(which, folder, device, dtype), device == "cuda"
    with torch.inference_mode():
        run(*inputs(256, batch, device))  # weights resident (t5kit maps them from the file) and kernels chosen
    ids, mask = inputs(length, batch, device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated() / 2**20
    else:
        _reset_peak_rss()
        held = _status_mb("VmRSS")
    with torch.inference_mode():
        run(ids, mask)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_mb("VmHWM")
    return {"peak_mb": round(peak, 1), "forward_mb": round(peak - held, 1)}


def measure_memory(which: str, folder: str, length: int, args) -> dict:
    """peak_memory() in a fresh process."""
    cmd = [sys.executable, __file__, "--memory-of", which, "--folder", folder, "--lengths", str(length),
           "--batch", str(args.batch), "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise RuntimeError(f"{which} at {length} tokens failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192, 16384])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--preset", default="long-t5-tglobal-base", help="a LongT5 preset (t5kit.PRESETS)")
    ap.add_argument("--layers", type=int, default=None, help="encoder layers (default: the preset's)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per contender, alternating")
    ap.add_argument("--warmup", type=int, default=1, help="untimed forwards per contender and length first")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--contenders", nargs="+", default=["t5kit", "transformers"], choices=["t5kit", "transformers"])
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # the memory subprocess
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(peak_memory(args.memory_of, args.folder, args.lengths[0], args.batch, args.device,
                                     args.dtype)))
        return
    import t5kit
    layers = args.layers or t5kit.get_preset(args.preset).num_layers
    cuda = args.device == "cuda"
    with tempfile.TemporaryDirectory() as folder:
        build(folder, args.preset, args.layers)
        runs = {which: load(which, folder, args.device, args.dtype) for which in args.contenders}
        for length in args.lengths:
            ids, mask = inputs(length, args.batch, args.device)
            for run in runs.values():
                for _ in range(args.warmup):
                    timed(run, ids, mask, cuda)
            times: dict[str, list[tuple[float, float]]] = {which: [] for which in runs}
            for _ in range(args.repeats):  # alternating: both contenders see the same machine
                for which, run in runs.items():
                    times[which].append(timed(run, ids, mask, cuda))
            row = {"bench": "long", "preset": args.preset, "layers": layers, "device": args.device,
                   "dtype": args.dtype, "batch": args.batch, "length": length}
            for which, ts in times.items():
                wall = statistics.median(t[0] for t in ts)
                row[f"{which}_tok_s"] = round(args.batch * length / wall, 1)
                if not cuda:
                    row[f"{which}_cpu_s"] = round(statistics.median(t[1] for t in ts), 2)
                row.update({f"{which}_{k}": v for k, v in measure_memory(which, folder, length, args).items()})
            if len(runs) == 2:
                row["ratio"] = round(row["t5kit_tok_s"] / row["transformers_tok_s"], 2)
                if not cuda:
                    row["cpu_ratio"] = round(row["transformers_cpu_s"] / row["t5kit_cpu_s"], 2)
            row.update(repeats=args.repeats, warmup=args.warmup)
            if not cuda:
                row["threads"] = args.threads
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

"""LongT5 encoder at long inputs: t5kit.T5Encoder vs transformers' LongT5EncoderModel, tokens/s
and peak memory, on a random checkpoint of google/long-t5-tglobal-base's shape (d_model 768, 12
heads x 64, d_ff 2048, 12 layers, local_radius 127, global blocks of 16, gated-gelu), built and
saved by transformers. One JSON line per length.

Every measurement is a fresh process (load, --warmup forwards, one timed forward), the contenders
alternating over --repeats (side by side: both see the same machine), so each one's peak memory
is its own: on CPU the peak resident set of the timed forward (Linux VmHWM, reset before it by
writing 5 to /proc/self/clear_refs: weights, activations and all), on CUDA
torch.cuda.max_memory_allocated. Reported: the median time as tokens/s, the largest peak, and the
largest peak over the memory held before the forward (the forward's own).

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


def worker(which: str, folder: str, length: int, batch: int, device: str, dtype: str, warmup: int) -> dict:
    """Load `which`, run `warmup` forwards, time one: {"seconds", "peak_mb", "held_mb"}."""
    torch_dtype, cuda = DTYPES[dtype], device == "cuda"
    if which == "t5kit":
        import t5kit
        model = t5kit.T5Encoder.from_pretrained(folder, dtype=torch_dtype, device=device)
        run = model
    else:
        import transformers
        model = transformers.LongT5EncoderModel.from_pretrained(folder, dtype=torch_dtype).to(device).eval()

        def run(ids, mask):
            return model(input_ids=ids, attention_mask=mask).last_hidden_state
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=gen)
    ids[:, -1] = 1
    ids, mask = ids.to(device), torch.ones_like(ids).to(device)
    with torch.inference_mode():
        for _ in range(warmup):
            run(ids, mask)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak_rss()
        held_mb = torch.cuda.memory_allocated() / 2**20 if cuda else _status_mb("VmRSS")
        t0 = time.perf_counter()
        run(ids, mask)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_mb("VmHWM")
    return {"seconds": seconds, "peak_mb": round(peak_mb, 1), "held_mb": round(held_mb, 1)}


def measure(which: str, folder: str, length: int, args) -> dict:
    """worker() in a fresh process (its peak memory is this case's alone)."""
    cmd = [sys.executable, __file__, "--worker", which, "--folder", folder, "--lengths", str(length),
           "--batch", str(args.batch), "--device", args.device, "--dtype", args.dtype,
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
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
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per contender, one process each")
    ap.add_argument("--warmup", type=int, default=1, help="untimed forwards before the timed one")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--contenders", nargs="+", default=["t5kit", "transformers"], choices=["t5kit", "transformers"])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.lengths[0], args.batch, args.device, args.dtype,
                                args.warmup)))
        return
    with tempfile.TemporaryDirectory() as folder:
        build(folder, args.preset, args.layers)
        for length in args.lengths:
            runs: dict[str, list[dict]] = {which: [] for which in args.contenders}
            for _ in range(args.repeats):  # alternating: both contenders see the same machine
                for which in args.contenders:
                    runs[which].append(measure(which, folder, length, args))
            layers = args.layers or __import__("t5kit").get_preset(args.preset).num_layers
            row = {"bench": "long", "preset": args.preset, "layers": layers, "device": args.device,
                   "dtype": args.dtype, "batch": args.batch, "length": length}
            for which, rs in runs.items():
                seconds = statistics.median(r["seconds"] for r in rs)
                row[f"{which}_tok_s"] = round(args.batch * length / seconds, 1)
                row[f"{which}_peak_mb"] = max(r["peak_mb"] for r in rs)
                row[f"{which}_forward_mb"] = round(max(r["peak_mb"] - r["held_mb"] for r in rs), 1)
            if len(runs) == 2:
                row["ratio"] = round(row["t5kit_tok_s"] / row["transformers_tok_s"], 2)
            row.update(repeats=args.repeats, warmup=args.warmup)
            if args.device == "cpu":
                row["threads"] = args.threads
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

"""New tokens/s of t5kit against transformers and CTranslate2, side by side and interleaved in one
process, on random checkpoints of published shapes: 64 input tokens, exactly 64 new tokens
(min_new_tokens = max). One JSON line per (shape, case) with medians over --repeats runs and the
ratios of t5kit over each contender.

    python benchmarks/generate.py --shapes t5-small t5-base --threads 2            # CPU, fp32 + int8
    python benchmarks/generate.py --device cuda --dtype bf16 --shapes t5-base       # GPU

Contenders: transformers' default `generate` and, on CUDA, its fastest mode
(`cache_implementation="static"`, which compiles itself on first use); CTranslate2 (the `[bench]`
extra) converting t5kit's own `save_pretrained` export, fp32 or int8 as the case asks, with its
greedy ids checked against t5kit's; it runs in a process of its own (see `CTranslate2`), driven
in turn with the others. First-call warm-up (compilation, graph capture) is reported
per contender, not counted in the medians.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

CASES = {  # name -> (batch, generate kwargs, int8)
    "greedy_b1": (1, {}, False),
    "greedy_b16": (16, {}, False),
    "greedy_b32": (32, {}, False),
    "beam4_b1": (1, {"num_beams": 4}, False),
    "int8_greedy_b1": (1, {}, True),
    "int8_greedy_b16": (16, {}, True),
    "int8_beam4_b1": (1, {"num_beams": 4}, True),
}
CPU_CASES = ["greedy_b1", "greedy_b16", "beam4_b1", "int8_greedy_b1", "int8_greedy_b16", "int8_beam4_b1"]
GPU_CASES = ["greedy_b1", "greedy_b32", "beam4_b1"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CT2_TYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
HAS_CT2 = importlib.util.find_spec("ctranslate2") is not None  # the [bench] extra


def write_word_tokenizer(folder: str, vocab_size: int) -> None:
    """A word-level tokenizer whose tokens are the ids' names ("<pad>", "</s>", "<unk>", "t3", ...):
    CTranslate2's converter reads the vocabulary from the checkpoint's tokenizer, and random
    checkpoints have none."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "</s>", "<unk>"] + [f"t{i}" for i in range(3, vocab_size)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # "t5 t17" is two tokens (benchmarks/serve.py sends text)
    tk.decoder = decoders.WordPiece()  # joins the words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tk,
                                   pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


def build(shape: str, folder: str, device: str, dtype: torch.dtype):
    import transformers

    import t5kit
    from t5kit.inference.cpu import for_inference
    cfg = t5kit.get_preset(shape)
    torch.manual_seed(0)
    hf_cls = transformers.T5Config if cfg.model_type == "t5" else transformers.MT5Config
    ref = transformers.T5ForConditionalGeneration(hf_cls(**cfg.to_hf_json())).eval()
    ref.save_pretrained(folder)
    write_word_tokenizer(folder, cfg.vocab_size)
    ref = ref.to(device=device, dtype=dtype)
    return ref, for_inference(t5kit.T5.from_pretrained(folder, dtype=dtype, device=device))  # as `t5kit generate`


class CTranslate2:
    """CTranslate2 in a process of its own, over the same checkpoint, timed inside that process.
    Not in ours: after one CTranslate2 call, small parallel PyTorch ops in the same process ran
    up to 5x slower (softmax of a 64 x 64 tensor: 3.6 -> 18.9 us; Intel's OpenMP runtime, which
    CTranslate2 loads, beside PyTorch's GNU one), which would have slowed every other contender."""

    def __init__(self, folder: str, quant: str, device: str, threads: int):
        import multiprocessing as mp

        self.conn, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(target=_ct2_serve, args=(child, folder, quant, device, threads),
                                                    daemon=True)
        self.proc.start()
        self.conn.recv()  # loaded

    def __call__(self, ids: list[list[int]], beam: int, n: int) -> Timed:
        self.conn.send((ids, beam, n))
        return Timed(*self.conn.recv())

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join()


@dataclass
class Timed:
    """A contender that timed itself (in its own process): seconds, and its output ids."""
    seconds: float
    ids: list[list[int]]


def _ct2_serve(conn, folder: str, quant: str, device: str, threads: int) -> None:
    import ctranslate2

    out = os.path.join(folder, f"ct2-{quant}")
    if not os.path.isdir(out):
        ctranslate2.converters.TransformersConverter(folder).convert(out, quantization=quant)
    tr = ctranslate2.Translator(out, device=device, compute_type=quant, intra_threads=threads, inter_threads=1)
    names = {0: "<pad>", 1: "</s>", 2: "<unk>"}
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        ids, beam, n = msg
        source = [[names.get(i, f"t{i}") for i in row] for row in ids]
        t0 = time.perf_counter()
        result = tr.translate_batch(source, beam_size=beam, max_decoding_length=n, min_decoding_length=n,
                                    max_batch_size=len(source))
        seconds = time.perf_counter() - t0
        back = {v: k for k, v in names.items()}
        conn.send((seconds, [[back.get(t) if t in back else int(t[1:]) for t in r.hypotheses[0]] for r in result]))


def timed(fn, device: str, settle: float = 0.0) -> float:
    """Seconds for one call (or what the contender measured itself). `settle` first lets the
    previous contender's worker threads go idle (OpenMP runtimes spin after a parallel region)."""
    time.sleep(settle)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out.seconds if isinstance(out, Timed) else time.perf_counter() - t0


def contenders(ref, ours, ct2, ids, mask, kw, n, device):
    """name -> zero-argument run function, each producing (batch, n) new ids."""
    common = dict(max_new_tokens=n, min_new_tokens=n, **kw)
    runs = {"t5kit": lambda: ours.generate(ids, mask, **common)}
    if ref is not None:
        runs["transformers"] = lambda: ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, **common)
        if device == "cuda":
            runs["transformers_static"] = lambda: ref.generate(
                input_ids=ids, attention_mask=mask, do_sample=False, cache_implementation="static", **common)
    if ct2 is not None:
        rows = ids.tolist()
        runs["ctranslate2"] = lambda: ct2(rows, kw.get("num_beams", 1), n)
    return runs


def bench_case(shape, case, ref, ours, ct2, args) -> dict:
    batch, kw, quant = CASES[case]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, ours.config.vocab_size - 100, (batch, args.input_tokens), generator=gen)
    ids[:, -1] = 1
    ids, mask = ids.to(args.device), torch.ones_like(ids).to(args.device)
    runs = contenders(ref, ours, ct2, ids, mask, kw, args.new_tokens, args.device)
    warmup = {name: round(timed(run, args.device), 2) for name, run in runs.items()}
    if "ctranslate2" in runs and not kw:  # greedy: CTranslate2 must produce t5kit's ids
        same = runs["ctranslate2"]().ids == ours.generate(ids, mask, max_new_tokens=args.new_tokens,
                                                                min_new_tokens=args.new_tokens).tolist()
    else:
        same = None
    times = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved: every contender sees the same machine noise
        for name, run in runs.items():
            times[name].append(timed(run, args.device, args.settle))
    tok_s = {name: batch * args.new_tokens / statistics.median(t) for name, t in times.items()}
    line = {"bench": "generate", "shape": shape, "case": case, "device": args.device,
            "dtype": "int8" if quant else args.dtype, "threads": args.threads, "repeats": args.repeats,
            "settle_s": args.settle}
    line.update({f"{name}_tok_s": round(v, 1) for name, v in tok_s.items()})
    line.update({f"t5kit_over_{name}": round(tok_s["t5kit"] / v, 2) for name, v in tok_s.items() if name != "t5kit"})
    line["warmup_s"] = warmup
    if same is not None:
        line["ctranslate2_greedy_ids_equal"] = same
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["t5-small", "t5-base"])
    ap.add_argument("--cases", nargs="+", choices=list(CASES), help="default: the CPU or GPU set for --device")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--input-tokens", type=int, default=64)
    ap.add_argument("--no-ctranslate2", action="store_true", help="leave CTranslate2 out even when installed")
    ap.add_argument("--settle", type=float, default=0.5,
                    help="seconds of idle before each timed call, so no contender runs beside the last one's "
                         "spinning threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = args.cases or (GPU_CASES if args.device == "cuda" else CPU_CASES)
    if args.device != "cpu" and any(CASES[c][2] for c in cases):
        ap.error("int8 cases run on CPU only")
    import t5kit

    for shape in args.shapes:
        with tempfile.TemporaryDirectory() as folder:
            ref, ours = build(shape, folder, args.device, DTYPES[args.dtype])
            int8 = None
            for case in cases:
                quant = CASES[case][2]
                if quant and int8 is None:
                    from t5kit.inference.cpu import for_inference
                    int8 = for_inference(t5kit.T5.from_pretrained(folder), "int8")
                ct2 = None if args.no_ctranslate2 or not HAS_CT2 else CTranslate2(
                    folder, "int8" if quant else CT2_TYPES[args.dtype], args.device, args.threads)
                line = bench_case(shape, case, None if quant else ref, int8 if quant else ours, ct2, args)
                print(json.dumps(line), flush=True)
                if ct2 is not None:
                    ct2.close()


if __name__ == "__main__":
    main()

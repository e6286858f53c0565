"""New tokens/s of t5kit against transformers and CTranslate2 on random checkpoints of published
shapes: 64 input tokens, exactly 64 new tokens (min_new_tokens = max). Every contender runs in a
process of its own, loaded once per shape and driven in turn, rounds interleaved, so every one
sees the same machine noise and none runs beside another's idle threads or caches (see `Worker`).
One JSON line per (shape, case): medians over --repeats rounds, the ratios of t5kit over each
contender, the CPU's model and ISA flags, and on CPU each contender as a fraction of the memory
bandwidth floor (`floor`). First-call warm-up (compilation, graph capture) is reported per
contender, not counted in the medians.

    python benchmarks/generate.py                         # CPU: t5-small and t5-base, fp32 + int8 (~6-10 min)
    python benchmarks/generate.py --shapes t5-small --cases greedy_b1 int8_greedy_b1
    python benchmarks/generate.py --profile --shapes t5-small --cases greedy_b1     # where a step's time goes
    python benchmarks/generate.py --decode-mode compile --cases greedy_b1 greedy_b16 beam4_b1  # the compiled step
    python benchmarks/generate.py --device cuda --dtype bf16 --shapes t5-base         # GPU

Contenders: t5kit as `t5kit generate` loads it (`for_inference`, fp32 or `--quantize int8` as the
case asks); transformers' default `generate` (fp32 cases) and, on CUDA, its fastest mode
(`cache_implementation="static"`, which compiles itself on first use); CTranslate2 (the `[bench]`
extra) converting the same checkpoint, fp32 or int8 as the case asks. The JSON says whether each
contender's ids equal t5kit's (greedy: CTranslate2 and transformers; beam: transformers, whose
beam search t5kit follows).

--profile breaks one t5kit decode step into GEMM time per projection (the decoder's Linears by
role, e.g. `attn.q`, `cross.o`, `ffn.wo`, and the LM head), attention over the cache (SDPA), the
cache write, norms, the other ATen ops (element-wise, embedding, casts) and the rest (Python,
dispatch, OpenMP wake-ups: the step's time outside every op), with torch.profiler.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import re
import statistics
import tempfile
import time

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


def cpu_info() -> dict:
    """The CPU's model name and ISA flags (AVX2, AVX-512, AVX512-BF16, AMX), PyTorch's kernel level
    and the CPU weight layout asked for ($T5KIT_CPU_LAYOUT; "auto": inference/cpu.choose_layout)."""
    from t5kit.inference.cpu import cpu_info as info
    return {**info(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "t5kit_cpu_layout": os.environ.get("T5KIT_CPU_LAYOUT") or "auto"}


def copy_bandwidth(threads: int, mib: int = 512) -> float:
    """GB/s of a large copy (STREAM's count: bytes read + bytes written), best of 5, on `threads`
    threads: the rate weights can stream from memory."""
    torch.set_num_threads(threads)
    src = torch.ones(mib * 2**18)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def step_weight_bytes(cfg, int8: bool) -> int:
    """Bytes of weights one decode step reads, whatever the batch: per decoder layer q, k, v, o of
    self-attention, q and o of cross-attention (its K/V are computed once per request), the FFN's 2
    or 3 matrices; then the LM head. fp32: 4 bytes a weight; int8: 1 (scales aside)."""
    attn = 6 * cfg.d_model * cfg.inner_dim
    ffn = (3 if cfg.is_gated else 2) * cfg.d_model * cfg.d_ff
    return (cfg.num_decoder_layers * (attn + ffn) + cfg.vocab_size * cfg.d_model) * (1 if int8 else 4)


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


def save_checkpoint(shape: str, folder: str) -> None:
    """A random transformers checkpoint of the preset's shape (seed 0) and its word tokenizer."""
    import transformers

    import t5kit
    cfg = t5kit.get_preset(shape)
    torch.manual_seed(0)
    hf_cls = transformers.T5Config if cfg.model_type == "t5" else transformers.MT5Config
    transformers.T5ForConditionalGeneration(hf_cls(**cfg.to_hf_json())).save_pretrained(folder)
    write_word_tokenizer(folder, cfg.vocab_size)


def load_t5kit(folder: str, device: str, dtype: torch.dtype, int8: bool):
    """t5kit as `t5kit generate` loads it: for_inference's CPU weights, int8 with --quantize int8."""
    import t5kit
    from t5kit.inference.cpu import for_inference
    if int8:
        return for_inference(t5kit.T5.from_pretrained(folder), "int8")
    return for_inference(t5kit.T5.from_pretrained(folder, dtype=dtype, device=device))


def _runner(kind: str, folder: str, device: str, dtype: str, threads: int):
    """-> a function (ids rows, beam, n) -> (seconds, new ids rows) for one contender, loaded."""
    if kind.startswith("ctranslate2"):
        import ctranslate2

        quant = "int8" if kind.endswith("int8") else CT2_TYPES[dtype]
        out = os.path.join(folder, f"ct2-{quant}")
        if not os.path.isdir(out):
            ctranslate2.converters.TransformersConverter(folder).convert(out, quantization=quant)
        tr = ctranslate2.Translator(out, device=device, compute_type=quant, intra_threads=threads, inter_threads=1)
        names = {0: "<pad>", 1: "</s>", 2: "<unk>"}
        back = {v: k for k, v in names.items()}

        def run_ct2(rows, beam, n):
            source = [[names.get(i, f"t{i}") for i in row] for row in rows]
            t0 = time.perf_counter()
            result = tr.translate_batch(source, beam_size=beam, max_decoding_length=n, min_decoding_length=n,
                                        max_batch_size=len(source))
            seconds = time.perf_counter() - t0
            return seconds, [[back[t] if t in back else int(t[1:]) for t in r.hypotheses[0]] for r in result]
        return run_ct2

    torch.set_num_threads(threads)
    if kind.startswith("t5kit"):
        model = load_t5kit(folder, device, DTYPES[dtype], kind.endswith("int8"))
        mode = "compile" if kind.endswith("compile") else "auto"

        def call(ids, mask, beam, n):
            return model.generate(ids, mask, max_new_tokens=n, min_new_tokens=n, num_beams=beam, decode_mode=mode)
    else:
        import transformers
        model = transformers.T5ForConditionalGeneration.from_pretrained(folder, dtype=DTYPES[dtype]).to(device).eval()
        extra = {"cache_implementation": "static"} if kind == "transformers_static" else {}

        def call(ids, mask, beam, n):
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, num_beams=beam, **extra)
            return out[:, 1:]  # the decoder start token

    def run_torch(rows, beam, n):
        ids = torch.tensor(rows, device=device)
        mask = torch.ones_like(ids)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = call(ids, mask, beam, n)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out.tolist()
    return run_torch


def _serve(conn, kind: str, folder: str, device: str, dtype: str, threads: int) -> None:
    run = _runner(kind, folder, device, dtype, threads)
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        conn.send(run(*msg))


class Worker:
    """One contender in a process of its own, loaded once, timed inside that process. Sharing one
    process skewed the figures both ways: after one CTranslate2 call, small parallel PyTorch ops
    ran up to 5x slower (Intel's OpenMP runtime, which CTranslate2 loads, beside PyTorch's GNU one:
    softmax of a 64 x 64 tensor 3.6 -> 18.9 us), and after one transformers `generate` the next
    t5kit call ran at 16 instead of 85 tok/s (t5-small greedy b1, AMD EPYC): transformers' growing
    cache makes new oneDNN primitives every step, evicting t5kit's from oneDNN's primitive cache
    (ONEDNN_PRIMITIVE_CACHE_CAPACITY=8192 made it go away)."""

    def __init__(self, kind: str, folder: str, device: str, dtype: str, threads: int):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, kind, folder, device, dtype, threads), daemon=True)
        self.proc.start()
        self.conn.recv()  # loaded

    def __call__(self, rows: list[list[int]], beam: int, n: int) -> tuple[float, list[list[int]]]:
        self.conn.send((rows, beam, n))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join()


def contender_kinds(case: str, device: str, ct2: bool, decode_mode: str = "auto") -> dict[str, str]:
    """Name in the JSON -> worker kind, for one case."""
    int8 = CASES[case][2]
    kinds = {"t5kit": "t5kit_int8" if int8 else "t5kit_compile" if decode_mode == "compile" else "t5kit"}
    if not int8:
        kinds["transformers"] = "transformers"
        if device == "cuda":
            kinds["transformers_static"] = "transformers_static"
    if ct2:
        kinds["ctranslate2"] = "ctranslate2_int8" if int8 else "ctranslate2"
    return kinds


def bench_case(shape: str, case: str, workers: dict[str, Worker], args, floor: dict | None) -> dict:
    batch, kw, int8 = CASES[case]
    beam, n = kw.get("num_beams", 1), args.new_tokens
    import t5kit
    vocab = t5kit.get_preset(shape).vocab_size
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab - 100, (batch, args.input_tokens), generator=gen)
    ids[:, -1] = 1
    rows = ids.tolist()
    warm = {name: w(rows, beam, n) for name, w in workers.items()}
    times = {name: [] for name in workers}
    for _ in range(args.repeats):  # rounds interleaved: every contender sees the same machine noise
        for name, w in workers.items():
            time.sleep(args.settle)
            times[name].append(w(rows, beam, n)[0])
    tok_s = {name: batch * n / statistics.median(t) for name, t in times.items()}
    line = {"bench": "generate", "shape": shape, "case": case, "device": args.device,
            "dtype": "int8" if int8 else args.dtype, "threads": args.threads, "repeats": args.repeats,
            "settle_s": args.settle, **cpu_info(), "t5kit_decode_mode": "auto" if int8 else args.decode_mode}
    line.update({f"{name}_tok_s": round(v, 1) for name, v in tok_s.items()})
    line.update({f"t5kit_over_{name}": round(tok_s["t5kit"] / v, 2) for name, v in tok_s.items() if name != "t5kit"})
    line["warmup_s"] = {name: round(s, 2) for name, (s, _) in warm.items()}
    for name, (_, out) in warm.items():
        if name != "t5kit" and (beam == 1 or name.startswith("transformers")):
            line[f"{name}_ids_equal"] = out == warm["t5kit"][1]
    if floor is not None:  # one step reads every weight once, whatever the batch: B tokens per step
        mb = step_weight_bytes(t5kit.get_preset(shape), int8) / 1e6
        floor_tok_s = batch * floor["copy_gb_s"] * 1e3 / mb
        line.update({"step_weight_mb": round(mb, 1), "copy_gb_s": floor["copy_gb_s"],
                     "floor_tok_s": round(floor_tok_s, 1)})
        line.update({f"{name}_of_floor": round(v / floor_tok_s, 2) for name, v in tok_s.items()})
    return line


def _role(name: str) -> str:
    """'decoder.blocks.3.attn.q' -> 'attn.q'; 'lm_head' -> 'lm_head'."""
    return re.sub(r"^decoder\.blocks\.\d+\.", "", name)


def profile_case(shape: str, case: str, folder: str, args) -> dict:
    """One JSON line: where a t5kit decode step's time goes (see the module's docstring), ms per step."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from t5kit.inference import engine
    batch, kw, int8 = CASES[case]
    beam = kw.get("num_beams", 1)
    torch.set_num_threads(args.threads)
    model = load_t5kit(folder, args.device, DTYPES[args.dtype], int8)
    opened = []

    def label(tag):
        def enter(_mod, _inputs):
            opened.append(record_function(tag))
            opened[-1].__enter__()

        def leave(_mod, _inputs, _out):
            opened.pop().__exit__(None, None, None)
        return enter, leave

    weights = {}  # role -> bytes per step
    for name, mod in model.named_modules():
        if (name.startswith("decoder.blocks.") or name == "lm_head") and hasattr(mod, "in_features"):
            role, tag = _role(name), "gemm:" + _role(name)
            if role.startswith("cross.") and role[6:] in ("k", "v", "kv"):
                continue  # once per request, outside the step
            weights[role] = weights.get(role, 0) + mod.in_features * mod.out_features * (1 if int8 else 4)
        elif name.startswith("decoder.") and type(mod).__name__ == "RMSNorm":
            tag = "norm"
        else:
            continue
        enter, leave = label(tag)
        mod.register_forward_pre_hook(enter)
        mod.register_forward_hook(leave)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size - 100, (batch, args.input_tokens), generator=gen)
    steps = args.profile_steps
    with torch.inference_mode():
        dec = engine.start(model, ids, None, beam, steps + 8, "eager")
        tokens = torch.zeros(batch * beam, 1, dtype=torch.long)
        for _ in range(4):
            dec(tokens)
        t0 = time.perf_counter()
        for _ in range(steps // 2):
            dec(tokens)
        plain_ms = (time.perf_counter() - t0) / (steps // 2) * 1e3
        dec = engine.start(model, ids, None, beam, steps + 8, "eager")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with record_function("step"):
                    dec(tokens)
    events = prof.events()
    buckets: dict[str, float] = {}
    calls: dict[str, int] = {}
    total = 0.0

    def add(key, us):
        buckets[key] = buckets.get(key, 0.0) + us
        calls[key] = calls.get(key, 0) + 1
    for e in events:
        parent = e.cpu_parent
        if e.name == "step":
            total += e.cpu_time_total
        elif parent is not None and parent.name == "step":  # a top-level op or labelled range of the step
            if e.name.startswith("gemm:"):
                add(e.name, e.cpu_time_total)
            elif e.name == "norm":
                add("norms", e.cpu_time_total)
            elif "scaled_dot_product" in e.name:
                add("attention (SDPA over the cache)", e.cpu_time_total)
            elif e.name in ("aten::index_put_", "aten::index_put", "aten::_index_put_impl_"):
                add("cache write", e.cpu_time_total)
            else:
                add("other aten ops (element-wise, embedding, casts)", e.cpu_time_total)
    gemm = {k[5:]: v for k, v in buckets.items() if k.startswith("gemm:")}
    layouts = {_role(name): getattr(mod, "layout", type(mod).__name__) for name, mod in model.named_modules()
               if name.startswith("decoder.blocks.0.") or name == "lm_head"}
    line = {"bench": "generate_profile", "shape": shape, "case": case, "dtype": "int8" if int8 else args.dtype,
            "threads": args.threads, "steps": steps, **cpu_info(),
            "step_ms_unprofiled": round(plain_ms, 3), "step_ms_profiled": round(total / steps / 1e3, 3),
            "gemm_ms": round(sum(gemm.values()) / steps / 1e3, 3), "gemm": {}}
    for role, us in sorted(gemm.items(), key=lambda kv: -kv[1]):
        per_step = calls["gemm:" + role] / steps
        line["gemm"][role] = {"ms": round(us / steps / 1e3, 3), "calls": per_step,
                              "us_per_call": round(us / calls["gemm:" + role], 1),
                              "mb": round(weights[role] / 1e6, 1),
                              "gb_s": round(weights[role] / (us / steps * 1e-6) / 1e9, 1)}
    line.update({k + "_ms": round(v / steps / 1e3, 3) for k, v in buckets.items() if not k.startswith("gemm:")})
    line["rest_ms"] = round((total - sum(buckets.values())) / steps / 1e3, 3)
    line["layouts"] = {role: layouts[role] for role in line["gemm"]}
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["t5-small", "t5-base"])
    ap.add_argument("--cases", nargs="+", choices=list(CASES), help="default: the CPU or GPU set for --device")
    ap.add_argument("--contenders", nargs="+", choices=["transformers", "ctranslate2"],
                    default=["transformers", "ctranslate2"], help="beside t5kit (CTranslate2 when installed)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--input-tokens", type=int, default=64)
    ap.add_argument("--no-ctranslate2", action="store_true", help="leave CTranslate2 out even when installed")
    ap.add_argument("--settle", type=float, default=0.5,
                    help="seconds of idle before each timed call, so no contender runs beside the last one's "
                         "spinning threads")
    ap.add_argument("--decode-mode", default="auto", choices=["auto", "compile"],
                    help="t5kit's fp32 decode step (`--decode-mode` of t5kit generate); compile: its first call "
                         "per shape compiles (warmup_s), int8 cases stay eager")
    ap.add_argument("--profile", action="store_true", help="t5kit only: where a decode step's time goes")
    ap.add_argument("--profile-steps", type=int, default=32)
    args = ap.parse_args()
    cases = args.cases or (GPU_CASES if args.device == "cuda" else CPU_CASES)
    if args.device != "cpu" and any(CASES[c][2] for c in cases):
        ap.error("int8 cases run on CPU only")
    if args.profile and args.device != "cpu":
        ap.error("--profile breaks down the CPU step")
    ct2 = HAS_CT2 and not args.no_ctranslate2 and "ctranslate2" in args.contenders
    floor = {"copy_gb_s": round(copy_bandwidth(args.threads), 1)} if args.device == "cpu" else None
    for shape in args.shapes:
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(shape, folder)
            if args.profile:
                for case in cases:
                    print(json.dumps(profile_case(shape, case, folder, args)), flush=True)
                continue
            workers: dict[str, Worker] = {}
            try:
                for case in cases:
                    kinds = contender_kinds(case, args.device, ct2, args.decode_mode)
                    kinds = {k: v for k, v in kinds.items() if k == "t5kit" or k in args.contenders
                             or k == "transformers_static" and "transformers" in args.contenders}
                    for kind in kinds.values():
                        if kind not in workers:
                            workers[kind] = Worker(kind, folder, args.device, args.dtype, args.threads)
                    line = bench_case(shape, case, {name: workers[kind] for name, kind in kinds.items()}, args, floor)
                    print(json.dumps(line), flush=True)
            finally:
                for w in workers.values():
                    w.close()


if __name__ == "__main__":
    main()

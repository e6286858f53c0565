"""Tokens/s of one full training step (forward, backward, AdamW step): t5kit vs transformers'
T5ForConditionalGeneration + torch.optim.AdamW, same shapes and data. Span-corruption shapes:
inputs 512, targets 114.

CPU (the default): batch 8, the two interleaved, one JSON line per (shape, dtype).

--device cuda: bf16 autocast, batch 64; each case measured alone, one JSON line per (shape, case):
transformers eager and torch.compile'd, t5kit eager and with each --compile mode (the training
loop's own parallel.apply and loss_terms). Reported: tokens/s (inputs + targets), % of
--peak-tflops, peak memory (torch.cuda.max_memory_allocated over build, warm-up and the timed
steps: weights, AdamW state, activations), and compile_s, the first step's time less a steady
step's (compilation and autotuning; eager rows show the first-step overhead alone).

FLOPs per step (`train_flops`) = 3 x forward matmul FLOPs (backward = 2 x forward), 2 per
multiply-add, with B batch, S = 512, T = 114, C d_model, HD heads x d_kv, F d_ff, V vocab, L layers:
  encoder, per layer: 4 B S C HD (q k v o) + 2 B S^2 HD (QK^T, AV) + (3|2) B S C F (gated|not FFN)
  decoder, per layer: 4 B T C HD + 2 B T^2 HD (self) + 2 B T C HD + 2 B S C HD + 2 B T S HD (cross)
                      + (3|2) B T C F
  LM head: B T C V
Causal self-attention is counted whole; norms, softmax, embeddings and recomputation are not.

    python benchmarks/train.py --shapes t5-small t5-v1_1-small --dtypes fp32 bf16
    python benchmarks/train.py --device cuda --shapes t5-v1_1-base
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

CUDA_CASES = ["transformers", "transformers_compiled", "t5kit", "t5kit_compile_block", "t5kit_compile_model"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["t5-small", "t5-v1_1-small"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 64 on CUDA")
    ap.add_argument("--steps", type=int, default=None, help="timed steps; default 4 on CPU, 20 on CUDA")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--compile", nargs="+", default=["block", "model"], choices=["block", "model"],
                    help="CUDA: the t5kit --compile modes measured beside eager")
    ap.add_argument("--cases", nargs="+", choices=CUDA_CASES, help="CUDA: the cases to measure, in this order "
                    "(default: all, transformers first; a compile case needs its mode in --compile)")
    ap.add_argument("--bf16-params", action="store_true", help="CUDA: t5kit rows with --bf16-params")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="CUDA: the GPU's dense bf16 peak "
                    "(989 for an H100 SXM)")
    args = ap.parse_args()
    if args.device == "cuda":
        cuda_rows(args)
        return
    args.batch, args.steps = args.batch or 8, args.steps or 4
    torch.set_num_threads(args.threads)
    import transformers

    import t5kit
    from t5kit.training.loss import loss_terms

    for shape in args.shapes:
        cfg = t5kit.get_preset(shape).replace(dropout_rate=0.0)
        torch.manual_seed(0)
        ref = transformers.T5ForConditionalGeneration(transformers.T5Config(**cfg.to_hf_json())).train()
        ours = t5kit.T5(cfg).train()
        ours.init_weights()
        opts = {"t5kit": torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True),
                "transformers": torch.optim.AdamW(ref.parameters(), lr=1e-4)}
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 32000, (args.batch, 512), generator=gen)
        labels = torch.randint(3, 32000, (args.batch, 114), generator=gen)
        dec = torch.cat([torch.zeros(args.batch, 1, dtype=torch.long), labels[:, :-1]], 1)
        batch = {"input_ids": ids, "decoder_input_ids": dec, "labels": labels}
        for dtype in args.dtypes:
            amp = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

            def step_ours():
                with amp:
                    loss, n, _ = loss_terms(ours, batch, 0.0)
                (loss / n).backward()
                opts["t5kit"].step()
                opts["t5kit"].zero_grad(set_to_none=True)

            def step_ref():
                with amp:
                    loss = ref(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec, labels=labels).loss
                loss.backward()
                opts["transformers"].step()
                opts["transformers"].zero_grad(set_to_none=True)

            step_ours(), step_ref()  # warm up, allocate optimizer state
            times = {"t5kit": [], "transformers": []}
            for _ in range(args.steps):
                for name, fn in (("t5kit", step_ours), ("transformers", step_ref)):
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            tokens = args.batch * (512 + 114)
            tps = {k: tokens / statistics.median(v) for k, v in times.items()}
            print(json.dumps({"bench": "train_step", "shape": shape, "dtype": dtype, "batch": args.batch,
                              "t5kit_tok_s": round(tps["t5kit"]), "transformers_tok_s": round(tps["transformers"]),
                              "ratio": round(tps["t5kit"] / tps["transformers"], 2), "steps": args.steps}), flush=True)


def train_flops(cfg, batch: int, src: int = 512, tgt: int = 114) -> int:
    """Matmul FLOPs of one training step, the formula of the module docstring."""
    c, hd, f, b = cfg.d_model, cfg.inner_dim, cfg.d_ff, batch
    ffn = 3 if cfg.is_gated else 2
    enc = 4 * b * src * c * hd + 2 * b * src * src * hd + ffn * b * src * c * f
    dec = (4 * b * tgt * c * hd + 2 * b * tgt * tgt * hd + 2 * b * tgt * c * hd + 2 * b * src * c * hd
           + 2 * b * tgt * src * hd + ffn * b * tgt * c * f)
    head = b * tgt * c * cfg.vocab_size
    return 3 * 2 * (cfg.num_layers * enc + cfg.num_decoder_layers * dec + head)


def cuda_rows(args) -> None:
    """One JSON line per (shape, case), each case built, warmed up and timed alone."""
    import transformers

    import t5kit
    from t5kit.training import parallel
    from t5kit.training.loss import loss_terms
    from t5kit.training.optim import OptimConfig, build_optimizer, fp32_masters

    batch, steps = args.batch or 64, args.steps or 20
    gen = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        cfg = t5kit.get_preset(shape).replace(dropout_rate=0.0)
        ids = torch.randint(3, cfg.vocab_size, (batch, 512), generator=gen).cuda()
        labels = torch.randint(3, cfg.vocab_size, (batch, 114), generator=gen).cuda()
        dec = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1]], 1)
        data = {"input_ids": ids, "decoder_input_ids": dec, "labels": labels}

        def hf_case(compiled: bool):
            torch.manual_seed(0)
            ref = transformers.T5ForConditionalGeneration(transformers.T5Config(**cfg.to_hf_json())).cuda().train()
            net = torch.compile(ref) if compiled else ref
            opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, fused=True)
            mask = torch.ones_like(ids)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = net(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step

        def ours_case(mode: str):
            torch.manual_seed(0)
            model = t5kit.T5(cfg).cuda().train()
            model.init_weights()
            if args.bf16_params:
                model.to(torch.bfloat16)
            net = parallel.apply(model, parallel.Layout(device="cuda"), compile=mode)
            opt = build_optimizer(model, OptimConfig(lr=1e-4))
            if args.bf16_params:
                fp32_masters(opt)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss, n, _ = loss_terms(net, data)
                (loss / n).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step

        cases = {"transformers": lambda: hf_case(False), "transformers_compiled": lambda: hf_case(True),
                 "t5kit": lambda: ours_case("none"),
                 **{f"t5kit_compile_{m}": (lambda m=m: ours_case(m)) for m in args.compile}}
        if args.cases:
            left_out = [c for c in args.cases if c not in cases]
            if left_out:
                raise SystemExit(f"--cases {' '.join(left_out)}: not measured with --compile {' '.join(args.compile)}")
            cases = {c: cases[c] for c in args.cases}
        flops = train_flops(cfg, batch)
        for name, make in cases.items():
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            step = make()
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            step()  # a second warm-up: recompilations after the first step, allocator settling
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            print(json.dumps({"bench": "train_step", "device": torch.cuda.get_device_name(), "shape": shape,
                              "case": name, "dtype": "bf16", "bf16_params": args.bf16_params and "t5kit" in name,
                              "batch": batch, "tok_s": round(batch * (512 + 114) / t),
                              "pct_peak": round(100 * flops / t / 1e12 / args.peak_tflops, 1),
                              "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20),
                              "compile_s": round(first - t, 2), "steps": steps}), flush=True)
            del step


if __name__ == "__main__":
    main()

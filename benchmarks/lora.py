"""LoRA against transformers + peft, same shapes and data (issue 21): training state, peak memory and
step time for full fine-tuning and for LoRA, and generation speed with an adapter.

    python benchmarks/lora.py                              # CPU, t5-base shape (about 5 minutes on 2 cores)
    python benchmarks/lora.py --compile block --cases t5kit_lora peft_lora --no-memory --no-generate
    python benchmarks/lora.py --device cuda --shape flan-t5-xl --batch 8 --inputs 512 --targets 114

One JSON line per measurement:
- "lora_state": bytes of weights, gradients and optimizer state after one step, per framework and
  case (full: every weight trained, AdamW; lora: rank --rank adapters on --targets, every other
  weight frozen). optim_ratio = LoRA's optimizer state over full fine-tuning's.
- "lora_memory": peak memory of each case alone over 2 training steps: on CPU the peak RSS of a
  fresh process while it steps (interpreter and libraries included, the model's build not), on CUDA
  max_memory_allocated.
- "lora_step": seconds per training step (forward, backward, AdamW), t5kit and transformers + peft
  interleaved step by step in one process (ABBA order), medians; speedup = transformers' time over
  t5kit's. Beside them the ceiling: each side's FLOPs per step (torch.utils.flop_counter, matmuls
  and attention; t5kit's only when not compiled), the rate that makes of each step, and the
  device's GEMM rate (a 4096^3 matmul in the run's dtype, `gemm_rate`); ceiling_speedup =
  transformers' step time over its FLOPs at that rate: no implementation doing the same arithmetic
  can beat transformers + peft by more.
- "lora_generate": new tokens/s of greedy decoding (batch 1, --inputs tokens, exactly --new-tokens
  new ones), interleaved rounds (ABBA order), medians: t5kit without and with the adapter (merged at load,
  T5.from_pretrained(adapter=)), transformers without and with it (peft's PeftModel, unmerged).

t5kit trains as `t5kit finetune --lora-rank` does (model/lora.add_lora on a frozen model, the
loop's loss_terms and build_optimizer; --bf16: bf16 autocast and, as --bf16-params, bf16 weights
with fp32 masters for what is trained); transformers + peft as peft's docs do (get_peft_model,
AdamW over the trainable parameters, the model's own loss; --bf16: bf16 weights, fp32 adapters,
autocast). Both start from the same random weights. Needs peft (the [test] extra).
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

CASES = ("t5kit_full", "t5kit_lora", "transformers_full", "peft_lora")


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="t5-base", help="a t5kit preset (t5-base, flan-t5-xl, ...)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q,v")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--inputs", type=int, default=128, help="input tokens per example")
    ap.add_argument("--targets-length", dest="target_len", type=int, default=32, help="target tokens per example")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per case")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help="generation rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast and bf16 weights (default on CUDA)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES, help="training cases measured")
    ap.add_argument("--compile", default="none", choices=["none", "block", "model"],
                    help="t5kit's training cases as `--compile` runs them (the warm-up step compiles)")
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # CPU peak memory: one case in a fresh process
    args = ap.parse_args(argv)
    args.bf16 = args.bf16 or args.device == "cuda"
    return args


def _batch(args, vocab: int, device: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.batch, args.inputs), generator=gen)
    labels = torch.randint(3, vocab, (args.batch, args.target_len), generator=gen)
    dec = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1]], 1)
    return {k: v.to(device) for k, v in {"input_ids": ids, "decoder_input_ids": dec, "labels": labels}.items()}


def build(case: str, args, weights: dict):
    """-> (step(), the module whose parameters count, the optimizer) for one case, from `weights`
    (a t5kit state dict), on the device."""
    import t5kit
    from t5kit.model.lora import LoraConfig, add_lora, parse_targets
    from t5kit.training import parallel
    from t5kit.training.loss import loss_terms
    from t5kit.training.optim import OptimConfig, build_optimizer, fp32_masters

    cfg = t5kit.get_preset(args.shape).replace(dropout_rate=0.0)
    data = _batch(args, cfg.vocab_size, args.device)
    amp = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16)
    targets = parse_targets(args.targets)
    if case.startswith("t5kit"):
        with torch.device("meta"):
            model = t5kit.T5(cfg)
        model.to_empty(device=args.device).load_state_dict(weights)  # a copy: each case starts alike
        model.train()
        if case == "t5kit_lora":
            model.requires_grad_(False)
            add_lora(model, LoraConfig(args.rank, 2 * args.rank, 0.0, targets), torch.Generator().manual_seed(0))
        if args.bf16:
            model.to(torch.bfloat16)
        net = parallel.apply(model, parallel.Layout(device=args.device), compile=args.compile)
        opt = build_optimizer(model, OptimConfig(lr=1e-4))
        if args.bf16:
            fp32_masters(opt)

        def step():
            with amp:
                loss, n, _ = loss_terms(net, data)
            (loss / n).backward()
            return opt
        return step, model, opt
    import peft
    import transformers

    from t5kit.model.hf import t5kit_to_hf
    with torch.device(args.device):  # drawn there (fast on CUDA), then overwritten with the same weights as t5kit's
        hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**cfg.to_hf_json()))
    hf.load_state_dict({t5kit_to_hf(k): v for k, v in weights.items()}, strict=False)  # tied: no lm_head
    hf.to(args.device, torch.bfloat16 if args.bf16 else torch.float32).train()
    if case == "peft_lora":
        hf = peft.get_peft_model(hf, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                     target_modules=list(targets), task_type="SEQ_2_SEQ_LM"))
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-4, fused=True)
    mask = torch.ones_like(data["input_ids"])

    def step():
        with amp:
            loss = hf(input_ids=data["input_ids"], attention_mask=mask, decoder_input_ids=data["decoder_input_ids"],
                      labels=data["labels"]).loss
        loss.backward()
        return opt
    return step, hf, opt


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_row(case: str, model, opt) -> dict:
    """Bytes held for training, gradients still in place (after backward, before the update)."""
    params = list(model.parameters())
    grads = _bytes(p.grad for p in params if p.grad is not None)
    opt.step()
    optim = _bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    opt.zero_grad(set_to_none=True)
    return {"case": case, "trained_params": sum(p.numel() for p in params if p.requires_grad),
            "weights_mb": round(_bytes(params) / 2**20, 2), "grads_mb": round(grads / 2**20, 2),
            "optim_mb": round(optim / 2**20, 3)}


def gemm_rate(device: str, dtype: torch.dtype) -> float:
    """FLOP/s of the device's GEMM: the best of 5 (4096 x 4096) @ (4096 x 4096) products."""
    a, b = (torch.randn(4096, 4096, device=device).to(dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * 4096**3 / best


def step_flops(step) -> int:
    """FLOPs of one training step (forward and backward) as torch.utils.flop_counter counts them."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step().zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _full_step(step) -> None:
    opt = step()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def child(args) -> None:
    """One case in this fresh process: build, then 2 steps; print the peak RSS of the steps (Linux:
    the high-water mark is reset once the model is built, `clear_refs` 5, so the two copies of
    the weights while building do not count)."""
    import gc
    weights = _weights(args)
    step, model, opt = build(args.child, args, weights)
    del weights
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    _full_step(step)
    _full_step(step)
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": round(int(hwm.split()[1]) / 1024)}))


def _model(args):
    """The random t5kit model every case starts from (init_weights, seed 0), drawn on the device."""
    import t5kit
    with torch.device(args.device):
        model = t5kit.T5(t5kit.get_preset(args.shape).replace(dropout_rate=0.0))
    model.init_weights(torch.Generator(args.device).manual_seed(0))
    return model


def _weights(args) -> dict:
    return _model(args).state_dict()


def training(args, out) -> None:
    info = {"shape": args.shape, "rank": args.rank, "targets": args.targets, "batch": args.batch,
            "inputs": args.inputs, "targets_length": args.target_len, "device": args.device, "bf16": args.bf16,
            "t5kit_compile": args.compile}
    weights = _weights(args) if args.device == "cuda" else None
    for case in [] if args.no_memory else args.cases:  # peak memory, each case alone
        if args.device == "cuda":  # what the case allocates beyond the starting weights held here
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step, model, opt = build(case, args, weights)
            _full_step(step)
            _full_step(step)
            peak = round((torch.cuda.max_memory_allocated() - before) / 2**20)
            del step, model, opt
        else:
            res = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", case], capture_output=True,
                                 text=True, check=True)
            peak = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        out({"bench": "lora_memory", **info, "case": case, "peak_mb": peak,
             "what": "max_memory_allocated" if args.device == "cuda" else "peak RSS of 2 steps, a process each"})
    # state and step time: the cases side by side, steps interleaved (one process, the same noise)
    weights = weights or _weights(args)
    pairs = [(a, b) for a, b in (("t5kit_full", "transformers_full"), ("t5kit_lora", "peft_lora"))
             if a in args.cases and b in args.cases]
    states = {}
    rate = gemm_rate(args.device, torch.bfloat16 if args.bf16 else torch.float32)
    for ours, theirs in pairs:
        steps, flops = {}, {}
        for case in (ours, theirs):
            step, model, opt = build(case, args, weights)
            step()  # the warm-up (compilation under --compile)
            states[case] = state_row(case, model, opt)
            out({"bench": "lora_state", **info, **states[case]})
            steps[case] = step
            if case == theirs or args.compile == "none":
                flops[case] = step_flops(step)
        times = {case: [] for case in steps}
        for i in range(args.steps):  # ABBA: neither side always runs right after the other
            for case, step in list(steps.items())[::1 if i % 2 == 0 else -1]:
                t0 = time.perf_counter()
                _full_step(step)
                _sync(args.device)
                times[case].append(time.perf_counter() - t0)
        t = {case: statistics.median(v) for case, v in times.items()}
        ceiling = {}
        for side, case in (("t5kit", ours), ("transformers", theirs)):
            if case in flops:
                ceiling.update({f"{side}_gflop": round(flops[case] / 1e9, 1),
                                f"{side}_gflop_s": round(flops[case] / t[case] / 1e9, 1)})
        out({"bench": "lora_step", **info, "kind": "lora" if "lora" in ours else "full", "t5kit_s": round(t[ours], 3),
             "transformers_s": round(t[theirs], 3), "speedup": round(t[theirs] / t[ours], 2), "steps": args.steps,
             **ceiling, "gemm_rate_gflop_s": round(rate / 1e9, 1),
             "ceiling_speedup": round(t[theirs] / (flops[theirs] / rate), 2)})
        del steps
    for ours, full in (("t5kit_lora", "t5kit_full"), ("peft_lora", "transformers_full")):
        if ours in states and full in states:
            out({"bench": "lora_state", **info, "case": f"{ours} / {full}",
                 "optim_ratio": round(states[ours]["optim_mb"] / states[full]["optim_mb"], 5)})


def generation(args, out) -> None:
    import peft
    import transformers

    import t5kit
    from t5kit.inference.cpu import for_inference
    from t5kit.model.lora import LoraConfig, add_lora, parse_targets, save_adapter

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = os.path.join(tmp, "base"), os.path.join(tmp, "adapter")
        model = _model(args).to(dtype)
        model.save_pretrained(base)
        lora = LoraConfig(args.rank, 2 * args.rank, 0.0, parse_targets(args.targets))
        gen = torch.Generator(args.device).manual_seed(1)
        add_lora(model, lora, gen)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:  # a trained adapter's B is not zero
                    p.normal_(0.0, 0.01, generator=gen)
        save_adapter(model, adapter, lora)
        del model
        hf = lambda: transformers.T5ForConditionalGeneration.from_pretrained(base, dtype=dtype)  # noqa: E731
        models = {
            "t5kit": for_inference(t5kit.T5.from_pretrained(base, dtype=dtype, device=args.device)),
            "t5kit_adapter": for_inference(t5kit.T5.from_pretrained(base, dtype=dtype, device=args.device,
                                                                    adapter=adapter)),
            "transformers": hf().to(args.device).eval(),
            "peft_adapter": peft.PeftModel.from_pretrained(hf().to(args.device), adapter).eval(),
        }
        ids = torch.randint(3, 32000, (1, args.inputs), generator=torch.Generator().manual_seed(2)).to(args.device)
        mask = torch.ones_like(ids)
        n = args.new_tokens

        def run(name):
            m = models[name]
            if name.startswith("t5kit"):
                return m.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n)
            return m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, num_beams=1)

        times = {name: [] for name in models}
        with torch.inference_mode():
            for name in models:
                run(name)  # warm-up
            for i in range(args.repeats):
                for name in list(models)[::1 if i % 2 == 0 else -1]:
                    _sync(args.device)
                    t0 = time.perf_counter()
                    run(name)
                    _sync(args.device)
                    times[name].append(time.perf_counter() - t0)
    tps = {name: round(n / statistics.median(v), 1) for name, v in times.items()}
    out({"bench": "lora_generate", "shape": args.shape, "device": args.device, "dtype": str(dtype)[6:],
         "inputs": args.inputs, "new_tokens": n, **{f"{k}_tok_s": v for k, v in tps.items()},
         "t5kit_adapter_vs_plain": round(tps["t5kit_adapter"] / tps["t5kit"], 3),
         "peft_adapter_vs_plain": round(tps["peft_adapter"] / tps["transformers"], 3),
         "t5kit_adapter_vs_peft_adapter": round(tps["t5kit_adapter"] / tps["peft_adapter"], 2),
         "repeats": args.repeats})


def main() -> None:
    args = _args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return

    def out(row: dict) -> None:
        print(json.dumps(row), flush=True)
    training(args, out)
    if not args.no_generate:
        generation(args, out)


if __name__ == "__main__":
    main()

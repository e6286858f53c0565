"""New tokens/s of t5kit vs transformers, side by side and interleaved, on random checkpoints of
published shapes. CPU, fp32, 64 input tokens, exactly 64 new tokens (min_new_tokens = max).
Prints one JSON line per (shape, case) with medians over --repeats runs and the ratio.

    python benchmarks/generate.py --shapes t5-small t5-v1_1-small t5-base --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

CASES = {  # name -> (batch, generate kwargs, int8)
    "greedy_b1": (1, {}, False),
    "greedy_b16": (16, {}, False),
    "beam4_b1": (1, {"num_beams": 4}, False),
    "int8_greedy_b1": (1, {}, True),
}


def build(shape: str, folder: str):
    import transformers

    import t5kit
    cfg = t5kit.get_preset(shape)
    torch.manual_seed(0)
    hf_cls = transformers.T5Config if cfg.model_type == "t5" else transformers.MT5Config
    ref = transformers.T5ForConditionalGeneration(hf_cls(**cfg.to_hf_json())).eval()
    ref.save_pretrained(folder)
    return ref, t5kit.T5.from_pretrained(folder)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["t5-small", "t5-v1_1-small", "t5-base"])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--input-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from t5kit.quantize import quantize_int8

    for shape in args.shapes:
        with tempfile.TemporaryDirectory() as folder:
            ref, ours = build(shape, folder)
            int8 = None
            for case in args.cases:
                batch, kw, quant = CASES[case]
                if quant and int8 is None:
                    int8 = quantize_int8(__import__("t5kit").T5.from_pretrained(folder))
                model = int8 if quant else ours
                gen = torch.Generator().manual_seed(1)
                ids = torch.randint(3, 32000, (batch, args.input_tokens), generator=gen)
                ids[:, -1] = 1
                mask = torch.ones_like(ids)
                n = args.new_tokens
                common = dict(max_new_tokens=n, min_new_tokens=n, **kw)
                run_ours = lambda: model.generate(ids, mask, **common)  # noqa: E731
                run_ref = lambda: ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, **common)  # noqa: E731
                run_ours(), run_ref()  # warm up
                t_ours, t_ref = [], []
                for _ in range(args.repeats):  # interleaved: both see the same machine noise
                    t_ours.append(timed(run_ours))
                    t_ref.append(timed(run_ref))
                tokens = batch * n
                ours_tps, ref_tps = tokens / statistics.median(t_ours), tokens / statistics.median(t_ref)
                print(json.dumps({"bench": "generate", "shape": shape, "case": case, "threads": args.threads,
                                  "t5kit_tok_s": round(ours_tps, 1), "transformers_tok_s": round(ref_tps, 1),
                                  "ratio": round(ours_tps / ref_tps, 2), "repeats": args.repeats}), flush=True)


if __name__ == "__main__":
    main()

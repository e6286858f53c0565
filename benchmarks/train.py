"""Tokens/s of one full training step (forward, backward, AdamW step): t5kit vs transformers'
T5ForConditionalGeneration + torch.optim.AdamW, same shapes and data, interleaved; CPU.
Span-corruption shapes: inputs 512, targets 114, batch 8. One JSON line per (shape, dtype).

    python benchmarks/train.py --shapes t5-small t5-v1_1-small --dtypes fp32 bf16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["t5-small", "t5-v1_1-small"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    import t5kit
    from t5kit.train import loss_terms

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


if __name__ == "__main__":
    main()

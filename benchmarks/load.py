"""Checkpoint load time and peak RSS: t5kit.T5.from_pretrained vs transformers' from_pretrained,
each in a fresh subprocess (so peak RSS is the load's own), alternating, medians over --repeats.

    python benchmarks/load.py --shape t5-base
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import resource, sys, time, torch
torch.set_num_threads(2)
which, folder = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if which == "t5kit":
    import t5kit
    model = t5kit.T5.from_pretrained(folder)
else:
    import transformers
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder)
dt = time.perf_counter() - t0
print(dt, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="t5-base")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch
    import transformers

    import t5kit
    cfg = t5kit.get_preset(args.shape)
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        transformers.T5ForConditionalGeneration(transformers.T5Config(**cfg.to_hf_json())).save_pretrained(folder)
        size_mb = sum(p.numel() * 4 for p in t5kit.T5(cfg).parameters()) / 2**20
        times: dict[str, list] = {"t5kit": [], "transformers": []}
        rss: dict[str, list] = {"t5kit": [], "transformers": []}
        for _ in range(args.repeats):
            for which in times:
                out = subprocess.run([sys.executable, "-c", CHILD, which, folder], capture_output=True, text=True, check=True)
                t, r = map(float, out.stdout.split())
                times[which].append(t)
                rss[which].append(r)
        med = {k: (statistics.median(times[k]), statistics.median(rss[k])) for k in times}
        print(json.dumps({"bench": "load", "shape": args.shape, "weights_mb": round(size_mb),
                          "t5kit_s": round(med["t5kit"][0], 2), "transformers_s": round(med["transformers"][0], 2),
                          "t5kit_peak_rss_mb": round(med["t5kit"][1]), "transformers_peak_rss_mb": round(med["transformers"][1]),
                          "time_ratio": round(med["transformers"][0] / med["t5kit"][0], 2), "repeats": args.repeats}))


if __name__ == "__main__":
    main()

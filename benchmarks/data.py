"""Pretraining data at scale (issue 18): preprocessing speed against the tokenizer's own, and
`t5kit pretrain`'s start-up time and peak memory per rank as the corpus grows.

Synthetic corpora on disk, random tokens of a 8k-piece SentencePiece vocabulary in documents of 1-2000
tokens: 10M and 100M tokens as t5kit token stores (version 1, as today's code writes them), 1B as
a Megatron .bin / .idx written directly (not tokenized). Synthetic text for the preprocessing
case (pseudo-words, Zipf-distributed) of --preprocess-sizes tokens.

Cases, one JSON line each:
- preprocess: `t5kit preprocess` tokens/s with 1 and 2 workers next to the tokenizer's own speed
  (one process, `Tokenizer.encode` over the same documents, reading excluded), measured back to
  back; `vs_raw` = tokens/s / (workers x raw tokens/s).
- startup: `t5kit pretrain` (tiny model, one step) on 1 and 2 CPU ranks (torchrun): seconds from
  process start to the end of the first step, and each rank's peak RSS when `train()` begins (all
  data prepared) and at the end; for this tree and, with --baseline SRC, another tree's code (e.g.
  a worktree of the commit before issue 18) where it can read the corpus (t5kit stores).

    python benchmarks/data.py --out /tmp/t5kit-data-bench --sizes 10M 100M 1B --baseline /tmp/wt-data/src
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

SIZES = {"10M": 10_000_000, "100M": 100_000_000, "1B": 1_000_000_000}
WRAPPER = """
import json, os, resource, sys, time
t0 = time.perf_counter()
import t5kit, t5kit.jobs.pretrain as job
seen = {}
def timed(*a, **k):
    seen["to_train_s"] = time.perf_counter() - t0
    seen["rss_at_train_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return real(*a, **k)
real, job.train = job.train, timed
from t5kit.cli import main
rc = main(sys.argv[1:])
print("RESULT", json.dumps({"rank": int(os.environ.get("RANK", 0)), "rc": rc, "t5kit": t5kit.__file__,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **seen}), flush=True)
"""


def synthetic_text(path: str, n_words: int, seed: int = 0) -> None:
    """Documents of 20-400 pseudo-words drawn Zipf-like from 30k words of 2-10 letters."""
    vocab_rng, rng = np.random.default_rng(0), np.random.default_rng(seed)  # the same words in every corpus
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(vocab_rng.choice(letters, vocab_rng.integers(2, 11))) for _ in range(30_000)]
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < n_words:
            ids = rng.choice(len(words), size=min(1_000_000, n_words - written), p=p)
            cuts = np.cumsum(rng.integers(20, 400, len(ids) // 20 + 1))
            f.writelines(" ".join(words[i] for i in doc) + "\n" for doc in np.split(ids, cuts[cuts < len(ids)]))
            written += len(ids)


def tokenizer(out: str):
    from t5kit.data.tokenizer import Tokenizer, train_tokenizer
    folder = os.path.join(out, "tok")
    if not os.path.isfile(os.path.join(folder, "spiece.model")):
        sample = os.path.join(out, "sample.txt")
        synthetic_text(sample, 300_000, seed=1)
        train_tokenizer([sample], 8000, folder)
    return Tokenizer.from_pretrained(folder)


def _doc_lengths(n_tokens: int, rng) -> np.ndarray:
    """Document lengths of 1-1999 tokens adding up to n_tokens."""
    lengths = rng.integers(1, 2000, n_tokens // 800 + 64)  # the mean is 1000: 25% to spare
    ends = np.cumsum(lengths)
    k = int(np.searchsorted(ends, n_tokens))
    lengths = lengths[:k + 1].copy()
    lengths[-1] -= int(ends[k] - n_tokens)
    return lengths[lengths > 0]


def write_store(folder: str, n_tokens: int, tok, megatron: bool, seed: int = 0) -> str:
    """Random tokens written directly: a version-1 t5kit store folder, or Megatron's prefix.bin/.idx."""
    from t5kit.data.megatron import write_index
    rng = np.random.default_rng(seed)
    lengths = _doc_lengths(n_tokens, rng)
    spec = folder + ("/data" if megatron else "")
    done = spec + (".idx" if megatron else "/header.json")
    if os.path.isfile(done):
        return spec
    os.makedirs(folder, exist_ok=True)
    with open(spec + ".bin" if megatron else os.path.join(folder, "tokens.bin"), "wb") as f:
        for a in range(0, n_tokens, 1 << 24):
            rng.integers(3, tok.vocab_size - 100, min(1 << 24, n_tokens - a), dtype=np.uint16).tofile(f)
    if megatron:
        with open(spec + ".lengths", "w+b") as lf, open(spec + ".idx", "wb") as f:
            lengths.astype(np.int32).tofile(lf)
            write_index(f, lf, len(lengths), np.uint16)
        os.remove(spec + ".lengths")
    else:
        np.save(os.path.join(folder, "offsets.npy"), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        with open(done, "w") as f:
            json.dump({"version": 1, "dtype": "uint16", "n_tokens": n_tokens, "n_docs": len(lengths),
                       "tokenizer": tok.fingerprint(), "sources": [], "skipped_lines": 0}, f)
    return spec


def _cpu_s(who) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def bench_preprocess(out: str, n_tokens: int, tok, workers: list[int]) -> dict:
    """Wall-clock tokens/s, and CPU seconds (this process and its reaped workers), which a shared,
    busy machine disturbs less: `cpu_vs_raw` = the tokenizer's CPU seconds / preprocessing's."""
    from t5kit.data.corpus import iter_documents
    from t5kit.data.store import build_token_store
    text = os.path.join(out, f"text-{n_tokens}.txt")
    if not os.path.isfile(text):
        docs = list(iter_documents(os.path.join(out, "sample.txt")))[:2000]
        per_word = sum(len(tok.encode(d, add_eos=False)) for d in docs) / sum(len(d.split()) for d in docs)
        synthetic_text(text, int(n_tokens / per_word), seed=2)
    row = {"case": "preprocess", "text_mb": round(os.path.getsize(text) / 2**20, 1)}
    busy, cpu, n = 0.0, 0.0, 0
    for doc in iter_documents(text):  # the tokenizer alone: reading excluded
        t, c = time.perf_counter(), time.process_time()
        n += len(tok.encode(doc, add_eos=False, parse_special=False))
        busy, cpu = busy + time.perf_counter() - t, cpu + time.process_time() - c
    row.update(tokens=n, raw_tokens_per_s=round(n / busy), raw_cpu_s=round(cpu, 2))
    for w in workers:
        t, c = time.perf_counter(), _cpu_s(resource.RUSAGE_SELF) + _cpu_s(resource.RUSAGE_CHILDREN)
        header = build_token_store([text], tok, os.path.join(out, f"pre-{w}"), workers=w, progress=False)
        wall, cpu_w = time.perf_counter() - t, _cpu_s(resource.RUSAGE_SELF) + _cpu_s(resource.RUSAGE_CHILDREN) - c
        speed = header["n_tokens"] / wall
        row.update({f"w{w}_tokens_per_s": round(speed), f"w{w}_vs_raw": round(speed / (w * row["raw_tokens_per_s"]), 3),
                    f"w{w}_cpu_s": round(cpu_w, 2), f"w{w}_cpu_vs_raw": round(cpu / cpu_w, 3)})
    return row


def bench_startup(out: str, spec: str, size: str, ranks: int, code: str, src: str | None) -> dict:
    run = os.path.join(out, f"run-{size}-{ranks}-{code}")
    args = ["pretrain", "--data-path", spec, "--tokenizer", os.path.join(out, "tok"), "--model-preset", "tiny",
            "--seq-length", "128", "--micro-batch-size", "4", "--train-iters", "1", "--save-interval", "0",
            "--save", run, "--log-interval", "1"]
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    env = {**os.environ, **({"PYTHONPATH": src} if src else {}), "OMP_NUM_THREADS": "1"}
    wrapper = os.path.join(out, "wrapper.py")
    with open(wrapper, "w") as f:
        f.write(WRAPPER)
    t = time.perf_counter()
    res = subprocess.run([*launcher, wrapper, *args], capture_output=True, text=True, env=env, timeout=3600, check=False)
    wall = time.perf_counter() - t
    rows = [json.loads(line.split("RESULT ", 1)[1]) for line in res.stdout.splitlines() if "RESULT " in line]
    row = {"case": "startup", "size": size, "ranks": ranks, "code": code, "wall_s": round(wall, 1),
           "ok": res.returncode == 0 and len(rows) == ranks}
    if not row["ok"]:
        return {**row, "error": res.stderr.strip().splitlines()[-1:] if res.stderr.strip() else res.returncode}
    with open(os.path.join(run, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    first = next(r for r in metrics if "first_step_s" in r)["first_step_s"]
    rows.sort(key=lambda r: r["rank"])
    return {**row, "to_first_step_s": round(max(r["to_train_s"] for r in rows) + first, 2),
            "rss_at_train_mib": [round(r["rss_at_train_mib"]) for r in rows],
            "peak_rss_mib": [round(r["peak_rss_mib"]) for r in rows], "t5kit": rows[0]["t5kit"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/t5kit-data-bench")
    ap.add_argument("--sizes", nargs="*", default=["10M", "100M", "1B"], choices=list(SIZES))
    ap.add_argument("--preprocess-sizes", nargs="*", default=["10M"], choices=list(SIZES))
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--baseline", help="src folder of another t5kit tree to compare (today's code): t5kit stores only")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tok = tokenizer(args.out)
    for size in args.preprocess_sizes:
        print(json.dumps({"size": size, **bench_preprocess(args.out, SIZES[size], tok, args.workers)}), flush=True)
    for size in args.sizes:
        megatron = SIZES[size] >= SIZES["1B"]  # Megatron's format at 1B; t5kit's (readable by both codes) below
        spec = write_store(os.path.join(args.out, f"corpus-{size}"), SIZES[size], tok, megatron)
        for ranks in args.ranks:
            print(json.dumps(bench_startup(args.out, spec, size, ranks, "this", None)), flush=True)
            if args.baseline and not megatron:
                print(json.dumps(bench_startup(args.out, spec, size, ranks, "baseline", args.baseline)), flush=True)


if __name__ == "__main__":
    main()

"""`t5kit serve` under load: one JSON line per round.

    python benchmarks/serve.py --shape t5-small --clients 32            # CPU, a random t5-small

Starts the server on 127.0.0.1 (a random checkpoint of the shape, written with transformers, and
a word-level tokenizer), then runs three rounds, each bounded in requests and in seconds:
- sequential: one client, one streamed request after another;
- concurrent: --clients clients at once, each sending --requests streamed requests;
- fault: the same load with every 4th client killed mid-stream, every 8th request oversized
  (413 expected) and every 8th malformed (400 expected); every other request must get its whole
  answer, and /health, polled throughout, must stay 200;
- beams: the concurrent load with --beam-clients of the clients sending beam requests
  (num_beams 4) instead: beam groups are stepped beside the streams (issue 17), so the streams'
  time to first token should stay that of the concurrent round, not grow by a beam request's length.
Figures: requests/s, generated tokens/s, p50 / p99 latency and time to first token, errors.
Requests sample (seeded; a random model's greedy choice is often the pad token, which streams no
text) with min_new_tokens = max_new_tokens, so every answer has a known length and a short one
counts as lost.
"""

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter

import httpx

sys.path.insert(0, os.path.dirname(__file__))
from generate import write_word_tokenizer  # noqa: E402


def build(shape: str, folder: str) -> int:
    """A random checkpoint of `shape` with a word-level tokenizer -> vocabulary size."""
    import torch
    import transformers

    import t5kit
    cfg = t5kit.get_preset(shape)
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(transformers.T5Config(**cfg.to_hf_json())).save_pretrained(folder)
    write_word_tokenizer(folder, cfg.vocab_size)
    return cfg.vocab_size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4) if xs else None


async def one(client: httpx.AsyncClient, body: dict, kill_after_first: bool = False) -> dict:
    """One streamed request -> {status, latency, ttft, tokens, complete}."""
    t0 = time.perf_counter()
    out = {"status": None, "ttft": None, "tokens": 0, "complete": False}
    try:
        async with client.stream("POST", "/v1/generate", json=body) as r:
            out["status"] = r.status_code
            if r.status_code == 200:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    event = json.loads(line[6:])
                    if "text" in event and out["ttft"] is None:
                        out["ttft"] = time.perf_counter() - t0
                        if kill_after_first:
                            break  # leaving the block closes the connection mid-stream
                    if "usage" in event:
                        out["tokens"] = event["usage"]["output_tokens"]
                        out["complete"] = out["tokens"] == body["parameters"]["max_new_tokens"]
            else:
                await r.aread()
    except httpx.HTTPError as e:
        out["status"] = type(e).__name__
    out["latency"] = time.perf_counter() - t0
    return out


async def run_round(url: str, name: str, clients: int, requests: int, prompt, new_tokens: int, seconds: float,
                    fault: bool = False, beam_clients: int = 0) -> dict:
    seeds = iter(range(10**9))

    def body(beam: bool = False) -> dict:
        params = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
        params.update({"num_beams": 4} if beam else {"do_sample": True, "seed": next(seeds)})
        return {"inputs": prompt(), "stream": True, "parameters": params}
    results, health_bad, stop = [], [], asyncio.Event()
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=seconds, limits=limits) as client:
        async def user(c: int):
            for k in range(requests):
                if time.perf_counter() > deadline:
                    return
                n = c * requests + k
                if fault and n % 8 == 3:  # oversized: 413
                    r = await client.post("/v1/generate", json={"inputs": "t5 " * 2000})
                    results.append({"kind": "oversized", "ok": r.status_code == 413})
                elif fault and n % 8 == 5:  # malformed JSON: 400
                    r = await client.post("/v1/generate", content=b'{"inputs": ',
                                          headers={"Content-Type": "application/json"})
                    results.append({"kind": "malformed", "ok": r.status_code == 400})
                elif fault and c % 4 == 1 and k == 0:  # killed mid-stream
                    res = await one(client, body(), kill_after_first=True)
                    results.append({"kind": "killed", "ok": res["status"] == 200})
                elif c < beam_clients:
                    res = await one(client, body(beam=True))
                    results.append({"kind": "beam", "ok": res["complete"], **res})
                else:
                    res = await one(client, body())
                    results.append({"kind": "good", "ok": res["complete"], **res})

        async def watch_health():
            while not stop.is_set():
                r = await client.get("/health")
                if r.status_code != 200:
                    health_bad.append(r.status_code)
                await asyncio.sleep(0.2)

        t0 = time.perf_counter()
        watcher = asyncio.create_task(watch_health())
        await asyncio.gather(*(user(c) for c in range(clients)))
        elapsed = time.perf_counter() - t0
        stop.set()
        await watcher
    good = [r for r in results if r["kind"] == "good"]
    done = [r for r in good if r["ok"]]
    line = {"round": name, "clients": clients, "requests": len(good), "seconds": round(elapsed, 2),
            "req_per_s": round(len(done) / elapsed, 2),
            "tokens_per_s": round(sum(r["tokens"] for r in done) / elapsed, 1),
            "p50_latency_s": pct([r["latency"] for r in done], 0.5), "p99_latency_s": pct([r["latency"] for r in done], 0.99),
            "p50_ttft_s": pct([r["ttft"] for r in done if r["ttft"]], 0.5),
            "p99_ttft_s": pct([r["ttft"] for r in done if r["ttft"]], 0.99),
            "errors": len(good) - len(done)}
    if line["errors"]:  # what went wrong: HTTP status or transport error, and tokens received
        line["error_kinds"] = dict(Counter(f"{r['status']}/{r['tokens']} tokens" for r in good if not r["ok"]))
    beams = [r for r in results if r["kind"] == "beam"]
    if beams:
        line["beam_requests"] = f"{sum(r['ok'] for r in beams)}/{len(beams)} complete"
        line["beam_p50_latency_s"] = pct([r["latency"] for r in beams if r["ok"]], 0.5)
    if fault:
        for kind in ("killed", "oversized", "malformed"):
            mine = [r for r in results if r["kind"] == kind]
            line[kind] = f"{sum(r['ok'] for r in mine)}/{len(mine)} as expected"
        line["lost_well_formed"] = len(good) - len(done)
        line["health_not_200"] = len(health_bad)
    return line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="t5-small")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=2, help="per client in the concurrent and fault rounds")
    ap.add_argument("--sequential", type=int, default=8, help="requests in the sequential round")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, nargs=2, default=(8, 48), help="min and max prompt length")
    ap.add_argument("--beam-clients", type=int, default=4, help="clients sending beam requests in the beams round")
    ap.add_argument("--seconds", type=float, default=300, help="bound on each round")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        vocab = build(args.shape, folder)
        prompt = lambda: " ".join(f"t{rng.randrange(3, vocab - 100)}" for _ in range(rng.randint(*args.prompt_tokens)))  # noqa: E731
        url = f"http://127.0.0.1:{free_port()}"
        server = subprocess.Popen([sys.executable, "-m", "t5kit", "serve", "--model", folder, "--port", url.rsplit(":", 1)[1],
                                   "--device", args.device,
                                   "--max-batch-size", str(args.clients + 3 * args.beam_clients),
                                   "--max-queue", str(4 * args.clients), "--max-input-tokens", "512",
                                   "--timeout", str(args.seconds)], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            deadline = time.time() + 300
            while True:
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
            asyncio.run(run_round(url, "warmup", 2, 1, prompt, 4, args.seconds))
            rounds = [("sequential", 1, args.sequential, False, 0), ("concurrent", args.clients, args.requests, False, 0),
                      ("fault", args.clients, args.requests, True, 0),
                      ("beams", args.clients, args.requests, False, args.beam_clients)]
            for name, clients, requests, fault, beams in rounds:
                line = asyncio.run(run_round(url, name, clients, requests, prompt, args.new_tokens, args.seconds, fault,
                                             beams))
                line.update(shape=args.shape, device=args.device, new_tokens=args.new_tokens)
                print(json.dumps(line), flush=True)
        finally:
            server.terminate()
            code = server.wait(120)
    print(json.dumps({"round": "shutdown", "exit_code": code}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`t5kit serve`: a real server process on a free loopback port, talked to with httpx. Outputs
equal one-by-one generation whatever shares the batch; streams assemble to the same text; bad
input gets a 4xx naming the field; a full queue 503; a timeout 504; a client that leaves frees
its row; SIGTERM drains and exits 0. Plus the cache concatenation the batching rests on."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import t5kit
from t5kit.data.tokenizer import Tokenizer
from t5kit.inference.cpu import for_inference
from t5kit.inference.generate import generate_texts
from t5kit.model.t5 import DecodeCache, mean_pool

httpx = pytest.importorskip("httpx")
KEY = {"Authorization": "Bearer sesame"}
LONG = {"max_new_tokens": 3000, "min_new_tokens": 3000}  # rows that stay in the batch for seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir, *flags, env: dict | None = None):
        self.url = f"http://127.0.0.1:{_free_port()}"
        port = self.url.rsplit(":", 1)[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}  # the tested t5kit, in the child too
        self.proc = subprocess.Popen([sys.executable, "-m", "t5kit", "serve", "--model", str(model_dir), "--port", port,
                                      *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not get healthy in 120 s"
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def post(self, path, body=None, headers=KEY, **kw):
        return httpx.post(self.url + path, json=body, headers=headers, timeout=60, **kw)

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


@pytest.fixture(scope="module")
def main_server(copy_model_dir):
    s = Server(copy_model_dir, "--max-batch-size", "16", "--api-key", "sesame", "--max-input-tokens", "64")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small_server(copy_model_dir):
    """One row, one waiting request, a 3 s timeout."""
    s = Server(copy_model_dir, "--max-batch-size", "1", "--max-queue", "1", "--timeout", "3",
               "--max-new-tokens-limit", "3000")
    yield s
    s.stop()


def _sse(lines) -> list[dict]:
    return [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]


def _assemble(events, n_inputs, n_seq) -> list[list[str]]:
    texts = [[""] * n_seq for _ in range(n_inputs)]
    for e in events[:-1]:
        texts[e["index"]][e.get("sequence", 0)] += e["text"]
    return texts


CASES = [  # (inputs, parameters, stream)
    (["copy: red blue", "copy: sun"], {"max_new_tokens": 20}, False),
    (["copy: apple tree house"], {"max_new_tokens": 20}, True),
    (["copy: one two", "copy: green"], {"do_sample": True, "seed": 7, "top_k": 0, "max_new_tokens": 20}, False),
    (["copy: cat dog", "copy: moon"], {"do_sample": True, "seed": 3, "num_return_sequences": 2,
                                      "temperature": 0.8, "max_new_tokens": 20}, True),
    (["copy: house river", "copy: tree"], {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 20}, False),
    (["copy: bird"], {"num_beams": 2, "max_new_tokens": 20}, True),
    (["copy: red red red"], {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "max_new_tokens": 20}, False),
    (["copy: sky"], {"min_new_tokens": 6, "max_new_tokens": 12}, True),
]


@pytest.mark.dist
def test_concurrent_mixed_requests_equal_one_by_one_generate(main_server, copy_model_dir):
    """Greedy, seeded sampling, beams and processors, some streamed, all at once (3 rounds, so
    requests join a batch already running) == generate_texts one request at a time, as
    `t5kit generate` runs it (`--seed` seeds the global generator)."""
    def call(case):
        inputs, params, stream = case
        body = {"inputs": inputs, "parameters": params, "stream": stream}
        if not stream:
            r = main_server.post("/v1/generate", body)
            assert r.status_code == 200, r.text
            return r.json()
        with httpx.stream("POST", main_server.url + "/v1/generate", json=body, headers=KEY, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = _sse(r.iter_lines())
        return {"outputs": _assemble(events, len(inputs), params.get("num_return_sequences", 1)),
                "usage": events[-1]["usage"]}

    with concurrent.futures.ThreadPoolExecutor(len(CASES)) as pool:
        answers = list(pool.map(call, CASES * 3))
    model = for_inference(t5kit.T5.from_pretrained(copy_model_dir))
    tok = Tokenizer.from_pretrained(copy_model_dir)
    for (inputs, params, stream), got in zip(CASES * 3, answers):
        kw = dict(params)
        if "seed" in kw:
            torch.manual_seed(kw.pop("seed"))
        want = generate_texts(model, tok, inputs, **kw)
        assert got["outputs"] == [w.outputs for w in want], (params, stream)
        assert got["usage"] == {"input_tokens": sum(len(tok.encode(t)) for t in inputs),
                                "output_tokens": sum(w.new_tokens for w in want)}
    assert main_server.metric("t5kit_generated_tokens_total") > 0


@pytest.mark.dist
def test_bad_input_gets_4xx_naming_the_field_and_serving_goes_on(main_server):
    too_long = "copy: " + "a" * 100
    cases = [  # (body or raw bytes, headers, status, field)
        (b'{"inputs": "x", ', {**KEY, "Content-Type": "application/json"}, 400, "body"),
        ({"parameters": {}}, KEY, 422, "inputs"),
        ({"inputs": ""}, KEY, 422, "inputs"),
        ({"inputs": []}, KEY, 422, "inputs"),
        ({"inputs": "x", "parameters": {"beams": 2}}, KEY, 422, "parameters.beams"),
        ({"inputs": "x", "temperature": 2}, KEY, 422, "temperature"),
        ({"inputs": "x", "parameters": {"top_p": 1.5}}, KEY, 422, "parameters.top_p"),
        ({"inputs": "x", "parameters": {"do_sample": True, "temperature": 0}}, KEY, 422, "parameters.temperature"),
        ({"inputs": "x", "parameters": {"max_new_tokens": 0}}, KEY, 422, "parameters.max_new_tokens"),
        ({"inputs": "x", "parameters": {"max_new_tokens": 10**6}}, KEY, 422, "parameters.max_new_tokens"),
        ({"inputs": "x", "parameters": {"seed": -1}}, KEY, 422, "parameters.seed"),
        ({"inputs": ["x"] * 9, "parameters": {"num_beams": 2}}, KEY, 422, "inputs"),  # 18 rows > 16
        ({"inputs": ["copy: a", too_long]}, KEY, 413, "inputs.1"),
        ({"inputs": "x"}, {}, 401, "Authorization"),
        ({"inputs": "x"}, {"Authorization": "Bearer wrong"}, 401, "Authorization"),
        ({"inputs": "x", "pool": "max"}, KEY, 422, "pool"),
    ]
    for i, (body, headers, status, field) in enumerate(cases):
        path = "/v1/embed" if i == len(cases) - 1 else "/v1/generate"
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(main_server.url + path, headers=headers, timeout=60, **kw)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["field"] == field and err["message"], (body, err)
    assert "1.5" in main_server.post("/v1/generate", {"inputs": "x", "parameters": {"top_p": 1.5}}).json()["error"]["message"]
    ok = main_server.post("/v1/generate", {"inputs": ["copy: a", too_long], "truncate": True,
                                           "parameters": {"max_new_tokens": 4}})
    assert ok.status_code == 200 and ok.json()["usage"]["input_tokens"] == len("copy: a") + 1 + 64
    ok = main_server.post("/v1/generate", {"inputs": "copy: a"}, headers={"X-API-Key": "sesame"})
    assert ok.status_code == 200 and httpx.get(main_server.url + "/health").status_code == 200


@pytest.mark.dist
def test_embed_equals_the_encoder(main_server, copy_model_dir):
    texts = ["copy: sun", "copy: apple tree"]
    model = t5kit.T5.from_pretrained(copy_model_dir)
    ids, mask = Tokenizer.from_pretrained(copy_model_dir).encode_batch(texts)
    with torch.no_grad():
        hidden = model.encode(ids, mask)
    mean = main_server.post("/v1/embed", {"inputs": texts}).json()["embeddings"]
    assert torch.allclose(torch.tensor(mean), mean_pool(hidden, mask), atol=1e-4)
    full = main_server.post("/v1/embed", {"inputs": texts, "pool": "none"}).json()["embeddings"]
    for row, h, m in zip(full, hidden, mask):
        assert torch.allclose(torch.tensor(row), h[:int(m.sum())], atol=1e-4)


@pytest.mark.dist
def test_metrics_and_openapi(main_server):
    text = httpx.get(main_server.url + "/metrics").text
    for name in ("t5kit_requests_total", "t5kit_queue_depth", "t5kit_batch_rows", "t5kit_generated_tokens_total",
                 "t5kit_request_seconds_bucket", "t5kit_time_to_first_token_seconds_bucket"):
        assert name in text
    paths = httpx.get(main_server.url + "/openapi.json").json()["paths"]
    assert {"/v1/generate", "/v1/embed", "/health", "/metrics"} <= set(paths)


def _wait_for(cond, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.dist
def test_full_queue_gets_503_with_retry_after(small_server):
    body = {"inputs": "copy: a", "parameters": {"max_new_tokens": 300, "min_new_tokens": 300}}
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: small_server.post("/v1/generate", body, headers={}), range(5)))
    codes = sorted(r.status_code for r in answers)
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
    busy = next(r for r in answers if r.status_code == 503)
    assert busy.headers["Retry-After"] == "1" and "queue" in busy.json()["error"]["message"]
    assert all(r.json()["usage"]["output_tokens"] == 300 for r in answers if r.status_code == 200)


@pytest.mark.dist
def test_client_disconnect_frees_its_row(small_server):
    body = {"inputs": "copy: a", "parameters": LONG, "stream": True}
    with httpx.stream("POST", small_server.url + "/v1/generate", json=body, timeout=60) as r:
        lines = r.iter_lines()  # held: a dropped iterator closes the response (a disconnect)
        next(line for line in lines if line.startswith("data: "))
        assert small_server.metric("t5kit_batch_rows") == 1
    # the connection is closed: the row must leave long before its 3000 steps are done
    assert _wait_for(lambda: small_server.metric("t5kit_batch_rows") == 0, 2.0)
    ok = small_server.post("/v1/generate", {"inputs": "copy: a", "parameters": {"max_new_tokens": 5}}, headers={})
    assert ok.status_code == 200


@pytest.mark.dist
def test_timeout_gets_504_and_frees_the_row(small_server):
    t0 = time.monotonic()
    r = small_server.post("/v1/generate", {"inputs": "copy: a", "parameters": LONG}, headers={})
    assert r.status_code == 504 and "timeout" in r.json()["error"]["message"]
    assert 2.5 < time.monotonic() - t0 < 6
    assert _wait_for(lambda: small_server.metric("t5kit_batch_rows") == 0, 2.0)


@pytest.mark.dist
def test_sigterm_stops_admission_finishes_in_flight_and_exits_0(copy_model_dir):
    server = Server(copy_model_dir)
    try:
        body = {"inputs": "copy: a", "parameters": {"max_new_tokens": 400, "min_new_tokens": 400}, "stream": True}
        with httpx.stream("POST", server.url + "/v1/generate", json=body, timeout=60) as r:
            lines = r.iter_lines()
            events = [_sse([next(line for line in lines if line.startswith("data: "))])[0]]
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            try:  # admission stopped: 503, or the listening socket is already closed
                late = httpx.post(server.url + "/v1/generate", json={"inputs": "copy: b"}, timeout=10)
                assert late.status_code == 503, late.text
            except httpx.TransportError:
                pass
            events += _sse(lines)
        assert events[-1]["usage"]["output_tokens"] == 400  # the request in flight got its whole answer
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


@pytest.mark.dist
def test_api_key_from_the_environment(copy_model_dir):
    server = Server(copy_model_dir, env={"T5KIT_API_KEY": "from-env"})
    try:
        body = {"inputs": "copy: a", "parameters": {"max_new_tokens": 4}}
        assert server.post("/v1/generate", body, headers={}).status_code == 401
        assert server.post("/v1/generate", body, headers={"X-API-Key": "wrong"}).status_code == 401
        ok = server.post("/v1/generate", body, headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200 and len(ok.json()["outputs"]) == 1, ok.text
    finally:
        server.stop()


def test_decode_cache_cat_equals_separate_caches(copy_model_dir):
    """Rows of two caches (different source lengths and max_len, rows at different steps) stepped
    as one batch give each row's logits as its own cache does; truncate keeps them too."""
    model = t5kit.T5.from_pretrained(copy_model_dir).eval()
    tok = Tokenizer.from_pretrained(copy_model_dir)
    with torch.inference_mode():
        caches, tokens = [], []
        for texts, max_len in ((["copy: a b", "copy: sun"], 12), (["copy: apple tree house"], 20)):
            ids, mask = tok.encode_batch(texts)
            caches.append(model.new_cache(model.encode(ids, mask), mask, max_len))
            tokens.append(torch.zeros(len(texts), 1, dtype=torch.long))
        step = lambda c, t: model.logits(model.decode(t, cache=c))[:, -1]  # noqa: E731
        for _ in range(3):  # the first cache runs ahead
            tokens[0] = step(caches[0], tokens[0]).argmax(-1, keepdim=True)
        ref = [DecodeCache.cat([c]) for c in caches]  # copies: the joint batch steps from the same state
        joint = DecodeCache.cat(caches)
        assert joint.cross_bias.shape[-1] == max(c.cross_bias.shape[-1] for c in caches) and joint.max_len == 20
        joint.truncate(12)
        for _ in range(6):
            want = torch.cat([step(c, t) for c, t in zip(ref, tokens)])
            got = step(joint, torch.cat(tokens))
            assert torch.allclose(got, want, atol=1e-5)
            tokens = [w.argmax(-1, keepdim=True) for w in want.split([2, 1])]

"""`t5kit serve`: a real server process on a free loopback port, talked to with httpx. Outputs
equal one-by-one generation whatever shares the batch; streams assemble to the same text; bad
input gets a 4xx naming the field; a full queue 503; a timeout 504; a client that leaves frees
its row; SIGTERM drains and exits 0. Plus the cache concatenation the batching rests on, and the
scheduler driven directly (issue 17): beam groups and embed chunks step beside the other rows,
one host sync per step, incremental stream text, seeded sampling that ignores its neighbours."""

import concurrent.futures
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from torch.overrides import TorchFunctionMode

import t5kit
from t5kit.cli import main as cli_main
from t5kit.data.tokenizer import Tokenizer
from t5kit.inference.cpu import for_inference
from t5kit.inference.generate import generate, generate_texts
from t5kit.inference.generation import GenerationConfig
from t5kit.model.cache import DecodeCache
from t5kit.model.t5 import mean_pool
from t5kit.serving import scheduler as scheduler_module
from t5kit.serving.requests import Job
from t5kit.serving.scheduler import Scheduler

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
                                "output_tokens": sum(w.new_tokens for w in want), "truncated_inputs": 0}
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
    assert ok.json()["usage"]["truncated_inputs"] == 1  # the client is told (issue 17)
    ok = main_server.post("/v1/embed", {"inputs": [too_long, too_long, "copy: a"], "truncate": True})
    assert ok.status_code == 200 and ok.json()["usage"]["truncated_inputs"] == 2
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
def test_timeout_gets_504_and_frees_the_row(copy_model_dir):
    """A 1 s timeout, so that the 3000-token request outlives it on any machine: with small_server's
    3 s, a run on this 2-core EPYC finished it in time once the decode step got faster (issue 19)."""
    server = Server(copy_model_dir, "--max-batch-size", "1", "--timeout", "1", "--max-new-tokens-limit", "3000")
    try:
        t0 = time.monotonic()
        r = server.post("/v1/generate", {"inputs": "copy: a", "parameters": LONG}, headers={})
        assert r.status_code == 504 and "timeout" in r.json()["error"]["message"]
        assert 0.8 < time.monotonic() - t0 < 4
        assert _wait_for(lambda: server.metric("t5kit_batch_rows") == 0, 2.0)
    finally:
        server.stop()


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


# ---- issue 17: the scheduler driven directly, and a beam request under --timeout ----

class Events(list):
    """A job's events as the scheduler emits them (on its thread)."""

    def __init__(self):
        super().__init__()
        self.ended = threading.Event()

    def __call__(self, event):
        self.append(event)
        if event[0] in ("done", "error"):
            self.ended.set()

    def result(self, seconds: float = 120) -> dict:
        assert self.ended.wait(seconds), f"no answer in {seconds} s"
        assert self[-1][0] == "done", self[-1]
        return self[-1][1]

    def pieces(self, n_inputs: int, n_seq: int) -> list[list[str]]:
        texts = [[""] * n_seq for _ in range(n_inputs)]
        for _, index, seq, text in (e for e in self if e[0] == "piece"):
            texts[index][seq] += text
        return texts


def _job(tok, texts, stream=False, seed=None, kind="generate", **params) -> Job:
    return Job(kind=kind, ids=[tok.encode(t) for t in texts], emit=Events(), cfg=GenerationConfig(**params),
               seed=seed, stream=stream)


@contextlib.contextmanager
def _scheduler(model, tok, enter=None, max_batch_size=32):
    """A running Scheduler over the model; `enter` runs first on its thread (a torch function mode)."""
    def load():
        if enter is not None:
            enter()
        return model, tok
    s = Scheduler(load, max_batch_size=max_batch_size)
    s.start()
    assert s.ready.wait(60)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def copy_model(copy_model_dir):
    return for_inference(t5kit.T5.from_pretrained(copy_model_dir)), Tokenizer.from_pretrained(copy_model_dir)


def _want(model, tok, texts, seed=None, **params) -> list[list[str]]:
    """What `t5kit generate` (generate_texts) answers, `--seed` seeding the global generator."""
    if seed is not None:
        torch.manual_seed(seed)
    return [r.outputs for r in generate_texts(model, tok, texts, **params)]


def test_beam_group_steps_beside_greedy_rows_and_leaves_when_cancelled(copy_model):
    """Issue 17: a long beam request ran whole inside the scheduler thread; a greedy request sent
    meanwhile waited for it. Now the beam group is stepped in the same loop: the greedy request
    ends while the beam group runs, and a cancelled beam request frees its rows at the next step."""
    model, tok = copy_model
    with _scheduler(model, tok) as s:
        beam = _job(tok, ["copy: a"], num_beams=2, max_new_tokens=2000, min_new_tokens=2000)
        s.submit(beam)
        time.sleep(0.3)
        greedy = _job(tok, ["copy: cat dog"], stream=True, max_new_tokens=12)
        s.submit(greedy)
        got = greedy.emit.result()
        assert not beam.emit, "the greedy request waited for the beam request"
        assert got["outputs"] == _want(model, tok, ["copy: cat dog"], max_new_tokens=12)
        assert greedy.emit.pieces(1, 1) == got["outputs"]
        assert s.running_rows == 2  # the beam group's rows count in the batch
        beam.cancelled = True
        assert _wait_for(lambda: s.running_rows == 0, 2.0)
        time.sleep(0.2)
        assert not beam.emit  # cancelled: no answer, no piece


def test_beam_groups_equal_generate_when_stepped_with_other_rows(copy_model):
    """Beam jobs of different shapes, streamed or not, beside greedy rows == beam_search alone."""
    model, tok = copy_model
    cases = [(["copy: house river", "copy: tree"], dict(num_beams=3, num_return_sequences=2, max_new_tokens=20)),
             (["copy: bird"], dict(num_beams=4, length_penalty=0.6, early_stopping=True, max_new_tokens=20)),
             (["copy: lion whale"], dict(num_beams=2, early_stopping="never", max_new_tokens=16))]
    with _scheduler(model, tok) as s:
        jobs = [_job(tok, ["copy: zebra snake eagle"], max_new_tokens=30)]
        jobs += [_job(tok, texts, stream=i % 2 == 0, **params) for i, (texts, params) in enumerate(cases)]
        for job in jobs:
            s.submit(job)
        for job, (texts, params) in zip(jobs[1:], cases):
            got = job.emit.result()
            assert got["outputs"] == _want(model, tok, texts, **params), params
            if job.stream:
                assert job.emit.pieces(len(texts), params.get("num_return_sequences", 1)) == got["outputs"]


SYNCS = {"tolist", "item", "nonzero", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu",
         "masked_select", "unique"}


class SyncCounter(TorchFunctionMode):
    """Counts the calls that make the host wait for the device on CUDA (a value read back, or an
    output whose size depends on values: boolean-mask indexing, nonzero, tensor repeats) while
    `on` is set. On CPU nothing waits, but the same calls are made."""

    def __init__(self):
        super().__init__()
        self.on, self.count = False, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        mask = name in ("__getitem__", "__setitem__") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if isinstance(args[1], tuple)
                                                                             else (args[1],)))
        repeats = name == "repeat_interleave" and len(args) > 1 and isinstance(args[1], torch.Tensor)
        if self.on and (name in SYNCS or mask or repeats):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_one_host_sync_per_step(copy_model, monkeypatch):
    """Issue 17: the step read each job's tokens back (`tolist`), indexed by a boolean mask and
    called `nonzero`, per job. Now one copy per step brings everything the host needs."""
    model, tok = copy_model
    counter, per_step = SyncCounter(), []
    step = Scheduler._step

    def counted(self):
        before, counter.on = counter.count, True
        try:
            step(self)
        finally:
            counter.on = False
            per_step.append(counter.count - before)
    monkeypatch.setattr(Scheduler, "_step", counted)
    cases = [(["copy: red red red", "copy: sun"], dict(no_repeat_ngram_size=2, repetition_penalty=1.3), False),
             (["copy: one two", "copy: green"], dict(do_sample=True, num_return_sequences=2, top_p=0.9), True),
             (["copy: house river"], dict(num_beams=3, num_return_sequences=2), True),
             (["copy: sky"], dict(min_new_tokens=6), False)]
    with _scheduler(model, tok, enter=counter.__enter__) as s:
        jobs = [_job(tok, texts, stream=stream, seed=5, max_new_tokens=20, **params)
                for texts, params, stream in cases]
        for job in jobs:
            s.submit(job)
        for job, (texts, params, _) in zip(jobs, cases):
            assert job.emit.result()["outputs"] == _want(model, tok, texts, seed=5, max_new_tokens=20, **params)
    assert len(per_step) >= 6 and max(per_step) <= 1, per_step


@pytest.mark.gpu
def test_one_host_sync_per_step_on_cuda(copy_model_dir, monkeypatch):
    """The same on CUDA, as PyTorch counts it: in "warn" sync debug mode every call that makes the
    host wait for the device warns (torch.cuda.set_sync_debug_mode), blocking copies included, so
    the rows going back to the device must be pinned and non-blocking. The beam group's CUDA graph
    is captured beforehand by `generate` (a capture synchronizes; its slot is kept, engine.py)."""
    import warnings
    model = t5kit.T5.from_pretrained(copy_model_dir, device="cuda").eval()
    tok = Tokenizer.from_pretrained(copy_model_dir)
    per_step = []
    step = Scheduler._step

    def counted(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(self)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        per_step.append(sum("synchronizing" in str(w.message) for w in caught))
    monkeypatch.setattr(Scheduler, "_step", counted)
    beam = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 20}
    ids, mask = (x.cuda() for x in tok.encode_batch(["copy: house river"]))
    generate(model, ids, mask, **beam)
    jobs = [_job(tok, ["copy: red red red", "copy: sun"], max_new_tokens=20, no_repeat_ngram_size=2),
            _job(tok, ["copy: one two"], stream=True, seed=5, do_sample=True, num_return_sequences=2,
                 max_new_tokens=20),
            _job(tok, ["copy: house river"], stream=True, **beam)]
    with _scheduler(model, tok) as s:
        for job in jobs:
            s.submit(job)
        for job in jobs:
            job.emit.result()
    assert len(per_step) >= 6 and max(per_step) <= 1, per_step


def _tokenizers(tmp_path) -> list[Tokenizer]:
    """A SentencePiece model with byte fallback (multi-byte characters outside its pieces become
    UTF-8 byte pieces, like Llama's), ByT5's bytes, and Megatron's WordPiece (issue 18)."""
    import sentencepiece as spm
    words = "the quick brown fox jumps over lazy dog hello world café naïve über straße".split()
    rng = random.Random(0)
    lines = (" ".join(rng.choice(words) for _ in range(8)) for _ in range(2000))
    spm.SentencePieceTrainer.train(sentence_iterator=lines, model_prefix=str(tmp_path / "spiece"), vocab_size=300,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True,
                                   character_coverage=0.99, minloglevel=2)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "##s", "##e", "##d", "€", "日", "本", ".", ","]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    wordpiece = Tokenizer.from_megatron("BertWordPieceCase", vocab_file=str(tmp_path / "vocab.txt"), vocab_extra_ids=3)
    return [Tokenizer.from_pretrained(tmp_path), Tokenizer.byt5(), wordpiece]


def test_stream_text_pieces_join_to_the_decoded_text(tmp_path):
    """Incremental detokenization (issue 17): for SentencePiece (leading-space removal, byte
    pieces), ByT5 (bytes) and WordPiece (issue 18), multi-byte UTF-8 and special tokens included, the pieces join to
    exactly `decode`, and no piece ends inside a character that later tokens complete."""
    from t5kit.inference.generate import TextStream  # new in issue 17: the rest of this file runs on the old code

    text = "hello € world 日本 naïve 👍  the  end"
    rng = random.Random(1)
    for tok in _tokenizers(tmp_path):
        words = tok.encode(text, add_eos=False)
        space = tok.encode(" x", add_eos=False)[:1]  # SentencePiece: the lone "▁" piece; ByT5: a space
        cases = [tok.encode(text), space + space + tok.encode("the", add_eos=False), words[:5] + space + words[5:]]
        specials = [0, 2] + ([tok.sentinel_id(0)] if tok.kind in ("sentencepiece", "wordpiece") else [])
        pool = words + space * 8 + specials + list(range(3, min(260, len(tok))))  # bytes (ByT5) or any piece
        cases += [[rng.choice(pool) for _ in range(rng.randint(1, 40))] for _ in range(2000)]
        for ids in cases:
            stream, pieces, text_so_far = TextStream(tok), [], ""
            for k, token in enumerate(ids):
                pieces.append(stream.push(token))
                text_so_far += pieces[-1]
                assert tok.decode(ids[:k + 1]).startswith(text_so_far), (tok.kind, ids[:k + 1])
            pieces.append(stream.finish())
            assert "".join(pieces) == tok.decode(ids), (tok.kind, ids)


class CountingTokenizer:
    """A tokenizer that counts the ids it decodes."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, *args, **kw):
        ids = list(ids)
        self.decoded += len(ids)
        return self.tok.decode(ids, *args, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_streaming_decodes_each_token_a_bounded_number_of_times(copy_model):
    """Issue 17: every step decoded the row's whole output again (quadratic in its length)."""
    model, tok = copy_model
    counting = CountingTokenizer(tok)
    n = 600
    with _scheduler(model, counting) as s:
        job = _job(tok, ["copy: cat dog"], stream=True, max_new_tokens=n, min_new_tokens=n)
        s.submit(job)
        got = job.emit.result()
    assert got["usage"]["output_tokens"] == n and job.emit.pieces(1, 1) == got["outputs"]
    # a window of a few tokens per step, plus the answer's one decode (the old code: n * n / 2)
    assert counting.decoded < 10 * n, counting.decoded


def test_stream_has_no_text_after_eos_and_no_piece_after_done(copy_model):
    """Rows end at different steps (sampling, 3 sequences each): a row's pieces stop at its EOS,
    they join to its answer, and nothing follows the answer."""
    model, tok = copy_model
    with _scheduler(model, tok) as s:
        job = _job(tok, ["copy: cat dog horse", "copy: sun"], stream=True, seed=2, do_sample=True, temperature=1.5,
                   num_return_sequences=3, max_new_tokens=24)
        s.submit(job)
        got = job.emit.result()
        time.sleep(0.2)
    assert [e[0] for e in job.emit].index("done") == len(job.emit) - 1
    assert job.emit.pieces(2, 3) == got["outputs"]
    assert len({len(t) for texts in got["outputs"] for t in texts}) > 1  # rows really ended apart


def test_seeded_sampling_ignores_its_neighbours_and_equals_generate_and_the_cli(copy_model, copy_model_dir, capsys):
    """Issue 17: a seeded sampling request gives the same outputs alone, beside other requests
    (rows that end at other steps, another seed, a beam group), through `generate` on the GPU's
    sync schedule (finished rows leave every 16 steps), and through `t5kit generate --seed`, in
    one batch or one prompt per batch (`--batch-size 1`)."""
    model, tok = copy_model
    texts, seed = ["copy: one two three", "copy: green"], 7
    params = dict(do_sample=True, top_k=0, temperature=1.3, num_return_sequences=2, max_new_tokens=24)
    with _scheduler(model, tok) as s:
        alone = _job(tok, texts, seed=seed, **params)
        s.submit(alone)
        alone = alone.emit.result()["outputs"]
        crowd = [_job(tok, ["copy: zebra snake eagle lion"], max_new_tokens=40),
                 _job(tok, ["copy: a", "copy: b c"], seed=seed + 1, **params),
                 _job(tok, ["copy: bird"], num_beams=2, max_new_tokens=20)]
        for job in crowd[:2]:
            s.submit(job)
        time.sleep(0.05)  # the request joins a batch already running
        beside = _job(tok, texts, seed=seed, stream=True, **params)
        s.submit(beside)
        s.submit(crowd[2])
        beside = beside.emit.result()["outputs"]
    assert len({len(t) for row in alone for t in row}) > 1  # rows end at different steps
    assert beside == alone
    assert _want(model, tok, texts, seed=seed, **params) == alone
    assert _want(model, tok, texts, seed=seed, batch_size=1, **params) == alone
    ids, mask = tok.encode_batch(sorted(texts, key=lambda t: -len(tok.encode(t))))
    for sync_every in (1, 16):
        out = generate(model, ids, mask, generator=torch.Generator().manual_seed(seed), sync_every=sync_every,
                       **params)
        assert sorted(tok.decode_batch(out)) == sorted(t for row in alone for t in row), sync_every
    args = ["generate", "--model", str(copy_model_dir), "--json", "--seed", str(seed), "--do-sample", "--top-k", "0",
            "--temperature", "1.3", "--num-return-sequences", "2", "--max-new-tokens", "24"]
    for batch in ("16", "1"):
        assert cli_main(args + ["--batch-size", batch] + texts) == 0
        assert [json.loads(line)["outputs"] for line in capsys.readouterr().out.splitlines()] == alone


def test_embed_runs_in_bounded_chunks_between_decode_steps(copy_model, monkeypatch):
    """Issue 17: an embed request was encoded whole inside the scheduler thread. Now it is encoded
    ENCODE_TOKENS padded tokens at a time, with a decode step of the running rows between chunks,
    and gives what one encoder pass gives."""
    model, tok = copy_model
    monkeypatch.setattr(scheduler_module, "ENCODE_TOKENS", 40, raising=False)
    calls = []
    encode, logits = model.encode, model.logits
    monkeypatch.setattr(model, "encode", lambda ids, mask=None: calls.append(("encode", ids.numel())) or
                        encode(ids, mask), raising=False)
    monkeypatch.setattr(model, "logits", lambda h: calls.append(("step", 0)) or logits(h), raising=False)
    texts = [f"copy: {w} {w}" for w in ("cat", "dog", "bird", "fish", "horse", "mouse", "tiger", "lion")]
    with _scheduler(model, tok) as s:
        running = _job(tok, ["copy: a"], max_new_tokens=400, min_new_tokens=400)
        s.submit(running)
        assert _wait_for(lambda: s.running_rows == 1, 10)
        start = len(calls)
        embed = _job(tok, texts, kind="embed")
        s.submit(embed)
        vectors = embed.emit.result()["embeddings"]
        assert not running.emit  # still decoding: the embed request did not wait for it, nor it for the embed
        running.cancelled = True
    chunks = [k for k, (kind, _) in enumerate(calls[start:]) if kind == "encode"]
    assert len(chunks) >= 3 and all(calls[start + k][1] <= 40 for k in chunks), calls[start:]
    assert all(b - a > 1 for a, b in zip(chunks, chunks[1:]))  # decode steps between chunks
    ids, mask = tok.encode_batch(texts)
    with torch.inference_mode():
        want = mean_pool(encode(ids, mask), mask)
    assert torch.allclose(torch.tensor(vectors), want, atol=1e-5)


@pytest.fixture(scope="module")
def beam_server(copy_model_dir):
    """Room for a beam group of 8 rows beside a greedy row; a 3 s timeout."""
    s = Server(copy_model_dir, "--max-batch-size", "10", "--timeout", "3", "--max-new-tokens-limit", "2000")
    yield s
    s.stop()


@pytest.mark.dist
def test_beam_request_neither_stalls_others_nor_outlives_its_timeout(beam_server):
    """Issue 17's report: with --timeout 1, a 4-token greedy request sent while a long beam request
    ran got 504. Now it is answered while the beam group runs, the beam request gets its 504 and
    its rows leave. (2000 tokens: the group starts in about 0.4 s on an idle 2-core CPU, since a
    decode cache of L positions builds an (H, L, L) bias first, and runs for about 7 s.)"""
    beam = {"inputs": ["copy: a", "copy: b c"],
            "parameters": {"num_beams": 4, "max_new_tokens": 2000, "min_new_tokens": 2000}}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        t0 = time.monotonic()
        long = pool.submit(beam_server.post, "/v1/generate", beam, headers={})
        running = _wait_for(lambda: beam_server.metric("t5kit_batch_rows") == 8, 2.5)
        short = beam_server.post("/v1/generate", {"inputs": "copy: cat", "parameters": {"max_new_tokens": 4}},
                                 headers={})
        assert short.status_code == 200, short.text
        assert running and not long.done()  # answered while the beam group ran
        embedded = beam_server.post("/v1/embed", {"inputs": ["copy: cat", "copy: dog"]}, headers={})
        assert embedded.status_code == 200, embedded.text
        r = long.result()
    assert r.status_code == 504 and 2.5 < time.monotonic() - t0 < 10
    assert _wait_for(lambda: beam_server.metric("t5kit_batch_rows") == 0, 2.0)


@pytest.mark.dist
def test_adapter_merged_at_start_up_answers_as_the_adapted_model(copy_model_dir, tmp_path):
    """Issue 21: `serve --adapter` merges a LoRA adapter into the weights at start-up; its answers
    are those of the model with the adapter unmerged (model/lora.LoRALinear) and differ from the
    base model's."""
    from t5kit.model.lora import LoraConfig, add_lora, save_adapter
    adapted = t5kit.T5.from_pretrained(copy_model_dir)
    lora = LoraConfig(4, 8, targets=("q", "v", "wo"))
    gen = torch.Generator().manual_seed(0)
    add_lora(adapted, lora, gen)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.3, generator=gen)
    save_adapter(adapted, str(tmp_path / "adapter"), lora)
    tok = Tokenizer.from_pretrained(copy_model_dir)
    texts = ["copy: cat dog", "copy: whale", "copy: lion tiger eagle"]
    want = [r.outputs for r in generate_texts(adapted.eval(), tok, texts, max_new_tokens=12)]
    base = [r.outputs for r in generate_texts(t5kit.T5.from_pretrained(copy_model_dir), tok, texts, max_new_tokens=12)]
    assert want != base
    s = Server(copy_model_dir, "--adapter", str(tmp_path / "adapter"))
    try:
        r = s.post("/v1/generate", {"inputs": texts, "parameters": {"max_new_tokens": 12}}, headers={})
    finally:
        s.stop()
    assert r.status_code == 200, r.text
    assert r.json()["outputs"] == want

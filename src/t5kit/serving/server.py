"""`t5kit serve`: an HTTP inference server (FastAPI + uvicorn) over the continuous-batching
scheduler (scheduler.py), which owns the model on its own thread.

Endpoints: POST /v1/generate (JSON, or Server-Sent Events with "stream": true), POST /v1/embed,
GET /health (503 until the model is loaded and after shutdown began), GET /metrics (Prometheus),
and FastAPI's /docs. Errors are JSON {"error": {"field": ..., "message": ...}}: 400 malformed
JSON, 422 a bad field, 413 an input over --max-input-tokens (unless "truncate": true: then
usage.truncated_inputs counts the inputs cut), 401 a missing or wrong API key, 503 (with
Retry-After) a full queue or a server shutting down, 504 a request over --timeout.

The web stack is imported inside the functions that need it (the [serve] extra), so `t5kit`
builds its command line without it.
"""

import asyncio
import json
import os
import secrets
import signal
import time
from dataclasses import dataclass
from functools import cache

from ..data.tokenizer import Tokenizer, truncate_ids
from ..inference.cpu import for_inference
from ..inference.generation import GenerationConfig
from ..model.hf import resolve_dtype
from ..model.t5 import T5
from ..options import option
from .requests import Job, Rejected
from .scheduler import Scheduler

RETRY_AFTER_S = 1  # what a 503 asks the client to wait


@dataclass
class ServeConfig:
    """`t5kit serve`: the flags are these fields (annotations quoted: cli reads them as text, and
    this module is not `from __future__ import annotations`, for FastAPI resolves the handlers'
    annotations, whose request classes are local to `_schemas`)."""
    model: "str | None" = option("checkpoint directory or hub id (config.json + weights + tokenizer)", default=None)
    adapter: "str | None" = option("LoRA adapter folder or hub id (peft's format), merged into the weights at "
                                   "start-up", default=None)
    host: "str" = "127.0.0.1"
    port: "int" = 8000
    device: "str" = option("cpu | cuda | cuda:N", default="cpu")
    dtype: "str" = option("fp32 | bf16 | fp16", default="fp32")
    quantize: "str | None" = option("int8: int8 weights for CPU inference", default=None)
    max_batch_size: "int" = option("decode-batch rows (inputs x sequences, or x beams) running at once", default=32)
    max_queue: "int" = option("requests waiting to join the batch; more get 503 with Retry-After", default=64)
    max_input_tokens: "int" = option("longer inputs get 413, unless the request says \"truncate\": true", default=512)
    max_new_tokens_limit: "int" = option("the largest max_new_tokens a request may ask for", default=512)
    timeout: "float" = option("seconds a request may take, queueing included; then 504 and its rows are freed",
                              default=60.0)
    api_key: "str | None" = option("require 'Authorization: Bearer KEY' or 'X-API-Key: KEY' on /v1/* "
                                   "(default: the T5KIT_API_KEY variable; none: open)", default=None)

    def __post_init__(self):
        if self.api_key is None:
            self.api_key = os.environ.get("T5KIT_API_KEY") or None
        for name in ("max_batch_size", "max_queue", "max_input_tokens", "max_new_tokens_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected an integer >= 1")
        if self.timeout <= 0:
            raise ValueError(f"--timeout {self.timeout}: expected seconds > 0")


class ApiError(Exception):
    """An HTTP error answered as {"error": {"field", "message"}}."""

    def __init__(self, status: int, field: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers

    def body(self) -> dict:
        return {"error": {"field": self.field, "message": self.message}}


def _unavailable(message: str) -> ApiError:
    return ApiError(503, "", message, {"Retry-After": str(RETRY_AFTER_S)})


@cache
def _schemas():
    """The request bodies (pydantic; an unknown field is an error, not ignored)."""
    import dataclasses
    import typing
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

    # GenerationConfig's own fields, types and defaults (its checks give the ranges), and a seed.
    hints = typing.get_type_hints(GenerationConfig)
    Parameters = create_model(
        "Parameters", __config__=ConfigDict(extra="forbid"),
        __doc__="GenerationConfig's fields (its checks give the ranges) and a sampling seed.",
        **{f.name: (hints[f.name], f.default) for f in dataclasses.fields(GenerationConfig)},
        seed=(int | None, Field(None, ge=0, lt=2 ** 63, description="sampling seed; as `t5kit generate --seed`")))

    class Inputs(BaseModel):
        model_config = ConfigDict(extra="forbid")
        inputs: str | list[str] = Field(description="a text, or a list of texts")
        truncate: bool = Field(False, description="keep the first --max-input-tokens tokens of longer inputs "
                                                  "instead of answering 413; usage.truncated_inputs counts them")

        @field_validator("inputs")
        @classmethod
        def _not_empty(cls, v):
            texts = [v] if isinstance(v, str) else v
            if not texts or not all(t.strip() for t in texts):
                raise ValueError("expected a non-empty text or a non-empty list of non-empty texts")
            return texts

    class GenerateRequest(Inputs):
        parameters: Parameters = Field(default_factory=Parameters)
        stream: bool = Field(False, description="answer with Server-Sent Events, one per new piece of text")

    class EmbedRequest(Inputs):
        pool: Literal["mean", "none"] = Field("mean", description="mean: one vector per input (padding "
                                              "excluded); none: the encoder's output per token")

    return Parameters, GenerateRequest, EmbedRequest


def _load(cfg: ServeConfig, tok: Tokenizer):
    """The model as `t5kit generate` runs it (packed CPU weights, or int8), on the scheduler thread."""
    model = T5.from_pretrained(cfg.model, dtype=resolve_dtype(cfg.dtype), device=cfg.device, adapter=cfg.adapter)
    tok.check_model_vocab(model.config.vocab_size, f"{cfg.model}/config.json")
    return for_inference(model, cfg.quantize).eval(), tok


class Metrics:
    """Prometheus metrics in a registry of the app's own (two apps in one process do not clash)."""

    def __init__(self, scheduler: Scheduler):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        r = self.registry = CollectorRegistry()
        self.requests = Counter("t5kit_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("t5kit_request_seconds", "request latency (streams: until the last event)",
                                 ["endpoint"], registry=r)
        self.first_token = Histogram("t5kit_time_to_first_token_seconds", "streams: arrival to first text", registry=r)
        self.tokens = Counter("t5kit_generated_tokens", "tokens generated for answered requests", registry=r)
        self.cancelled = Counter("t5kit_cancelled_requests", "requests whose rows were freed early", ["reason"],
                                 registry=r)
        Gauge("t5kit_queue_depth", "requests waiting to join the batch", registry=r).set_function(
            lambda: scheduler.queue_depth)
        Gauge("t5kit_batch_rows", "rows in the running decode batch", registry=r).set_function(
            lambda: scheduler.running_rows)


class Gate:
    """ASGI middleware: the API key on /v1/*, then every request counted and timed (a pure ASGI
    wrapper: it does not buffer streams or hide client disconnects from them)."""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, status, t0 = scope["path"], 500, time.perf_counter()

        async def send_(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.api_key and path.startswith("/v1/") and not self._authorized(scope):
                err = ApiError(401, "Authorization", "missing or wrong API key: send 'Authorization: Bearer KEY' "
                                                     "or 'X-API-Key: KEY'", {"WWW-Authenticate": "Bearer"})
                from fastapi.responses import JSONResponse
                await JSONResponse(err.body(), err.status, err.headers)(scope, receive, send_)
            else:
                await self.app(scope, receive, send_)
        finally:
            endpoint = path if path in ("/v1/generate", "/v1/embed", "/health", "/metrics") else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    def _authorized(self, scope) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        auth = headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
        return secrets.compare_digest(given.encode(), self.api_key.encode())


def _validation_error(path: str, errors: list[dict]) -> ApiError:
    """FastAPI's first validation error -> 400 (malformed JSON) or 422 naming the field."""
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    name = ".".join(loc) or "body"
    if e["type"] == "json_invalid":
        return ApiError(400, "body", f"malformed JSON: {e.get('ctx', {}).get('error', e['msg'])}")
    if not loc and isinstance(e.get("input"), bytes):  # FastAPI parses JSON only when the type says so
        return ApiError(400, "body", "expected a JSON object, sent as Content-Type: application/json")
    if e["type"] == "extra_forbidden":
        parameters, generate, embed = _schemas()
        known = parameters if loc[0] == "parameters" else (embed if path == "/v1/embed" else generate)
        return ApiError(422, name, f"unknown field {loc[-1]!r}; expected one of {sorted(known.model_fields)}")
    if e["type"] == "missing":
        return ApiError(422, name, "required field missing")
    message = e["msg"].removeprefix("Value error, ")
    return ApiError(422, name, f"{message} (got {e.get('input')!r})" if "input" in e else message)


def create_app(cfg: ServeConfig):
    """The FastAPI app: the scheduler starts (and loads the model) with the app's lifespan and
    drains when it ends."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    if not cfg.model:
        raise ValueError("--model is required")
    tok = Tokenizer.from_pretrained(cfg.model)
    scheduler = Scheduler(lambda: _load(cfg, tok), cfg.max_batch_size, cfg.max_queue)
    metrics = Metrics(scheduler)
    Parameters, GenerateRequest, EmbedRequest = _schemas()

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        # uvicorn has already waited for the requests in flight; the queue drains before exit
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="t5kit serve", description=__doc__, lifespan=lifespan)
    app.state.scheduler = scheduler
    app.add_middleware(Gate, api_key=cfg.api_key, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), e.status, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = _validation_error(request.url.path, e.errors())
        return JSONResponse(err.body(), err.status)

    def encode(texts: list[str], truncate: bool) -> dict:
        """-> the Job fields `ids` and `truncated` (how many inputs were cut: usage.truncated_inputs)."""
        m, out, truncated = cfg.max_input_tokens, [], 0
        for i, text in enumerate(texts):
            ids = tok.encode(text)
            if len(ids) > m:
                if not truncate:
                    raise ApiError(413, f"inputs.{i}", f"input {i} has {len(ids)} tokens, more than "
                                   f"--max-input-tokens {m}; send \"truncate\": true to keep its first {m}")
                ids = truncate_ids(ids, m, tok.eos_id)  # as `t5kit generate` truncates
                truncated += 1
            out.append(ids)
        return {"ids": out, "truncated": truncated}

    def submit(job_kw: dict, arrival: float) -> tuple[Job, asyncio.Queue, float]:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), **job_kw)
        try:
            scheduler.submit(job)
        except Rejected as e:
            raise _unavailable(str(e)) from None
        except ValueError as e:
            raise ApiError(422, "inputs", str(e)) from None
        return job, events, arrival + cfg.timeout

    async def outcome(job: Job, events: asyncio.Queue, deadline: float, request: Request | None):
        """Yield the job's events up to ("done", result). Past the deadline: 504; client gone
        (polled when `request` is given; streams are cancelled by Starlette instead): the job is
        cancelled, its rows leave at the next step."""
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    metrics.cancelled.labels("timeout").inc()
                    raise ApiError(504, "", f"no answer within --timeout {cfg.timeout:g} s")
                try:
                    event = await asyncio.wait_for(events.get(), min(left, 0.25))
                except asyncio.TimeoutError:
                    if request is not None and await request.is_disconnected():
                        metrics.cancelled.labels("disconnect").inc()
                        raise ApiError(499, "", "client disconnected") from None
                    continue
                if event[0] == "error":
                    raise ApiError(500, "", event[1])
                yield event
                if event[0] == "done":
                    return
        finally:
            job.cancelled = True  # no-op once done; otherwise frees its rows

    @app.post("/v1/generate", summary="generate text (JSON, or Server-Sent Events with stream: true)")
    async def generate(body: GenerateRequest, request: Request):
        arrival = time.monotonic()
        p = body.parameters.model_dump()
        seed = p.pop("seed")
        try:
            gen = GenerationConfig(**p)
        except ValueError as e:
            name = str(e).split("=")[0]
            raise ApiError(422, f"parameters.{name}" if name in p else "parameters", str(e)) from None
        if gen.max_new_tokens > cfg.max_new_tokens_limit:
            raise ApiError(422, "parameters.max_new_tokens", f"max_new_tokens={gen.max_new_tokens}: expected at "
                                                             f"most --max-new-tokens-limit {cfg.max_new_tokens_limit}")
        inputs = encode(body.inputs, body.truncate)
        job, events, deadline = submit(dict(kind="generate", **inputs, cfg=gen, seed=seed, stream=body.stream), arrival)
        if not body.stream:
            async for event in outcome(job, events, deadline, request):
                pass
            metrics.tokens.inc(event[1]["usage"]["output_tokens"])
            return event[1]

        async def sse():
            first = True
            try:
                async for event in outcome(job, events, deadline, None):
                    if event[0] == "piece":
                        if first:
                            metrics.first_token.observe(time.monotonic() - arrival)
                            first = False
                        _, index, seq, text = event
                        data = {"index": index, "text": text, **({"sequence": seq} if gen.num_return_sequences > 1 else {})}
                    else:
                        metrics.tokens.inc(event[1]["usage"]["output_tokens"])
                        data = {"usage": event[1]["usage"]}
                    yield f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
            except ApiError as e:  # the status line is gone: the error is the last event
                yield f"data: {json.dumps({**e.body(), 'status': e.status})}\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/embed", summary="the encoder's output, mean-pooled unless pool is none")
    async def embed(body: EmbedRequest, request: Request):
        job, events, deadline = submit(dict(kind="embed", **encode(body.inputs, body.truncate), pool=body.pool),
                                       time.monotonic())
        async for event in outcome(job, events, deadline, request):
            pass
        return event[1]

    @app.get("/health", summary="200 once the model is loaded, 503 before and while shutting down")
    async def health():
        if scheduler.failed:
            return JSONResponse({"status": "failed", "error": scheduler.failed}, 503)
        if not scheduler.ready.is_set() or not scheduler.accepting:
            state = "loading" if scheduler.accepting else "shutting down"
            return JSONResponse({"status": state}, 503, {"Retry-After": str(RETRY_AFTER_S)})
        return {"status": "ok", "model": cfg.model}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(cfg: ServeConfig) -> dict:
    """Run the server until SIGTERM / SIGINT: admission stops at once (new requests get 503),
    uvicorn finishes the requests in flight, the scheduler drains, and this returns (exit 0)."""
    import uvicorn

    app = create_app(cfg)
    scheduler: Scheduler = app.state.scheduler

    class Draining(uvicorn.Server):
        def handle_exit(self, sig, frame):
            scheduler.close()
            super().handle_exit(sig, frame)

    server = Draining(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info",
                                     timeout_graceful_shutdown=cfg.timeout))
    scheduler.on_fail = lambda: setattr(server, "should_exit", True)
    # uvicorn re-raises the signal it caught once it has shut down; a drained server exits 0
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if scheduler.failed:
        raise ValueError(scheduler.failed)
    return {"model": cfg.model, "stopped": "drained"}

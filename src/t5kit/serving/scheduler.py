"""Continuous batching for `t5kit serve`: one thread owns the model; requests join the running
decode batch at the next step and leave the moment they finish.

Each iteration of the scheduler thread:
1. admits waiting jobs first in, first out while their rows fit in `max_batch_size` (a job that
   does not fit waits, and so does everything behind it: FIFO);
2. runs admitted beam-search and embedding jobs whole, as units of their own (beam search keeps
   its own batch and reorders it every step; `generate.generate` runs it exactly as `t5kit generate`);
3. encodes the admitted greedy / sampling jobs in one encoder pass and appends their rows to the
   running `DecodeCache` (`DecodeCache.cat`: each row keeps its own position, so rows at
   different steps share one decode step);
4. runs one decode step for every running row, picks each job's tokens with its own
   GenerationConfig and seeded generator (`generation.next_token` over that job's rows, as
   `generate.stream` does over a call's rows: the same seed gives the same samples), drops the rows
   that finished or whose job was cancelled (`DecodeCache.select`) and emits streamed text.

Jobs talk to the HTTP side through `Job.emit`, called on this thread; serve.py hands each event
to its event loop (`loop.call_soon_threadsafe`). The HTTP side cancels a job (timeout, client
gone) by setting `Job.cancelled`; its rows leave at the next step.

Shapes: N running rows, V vocabulary, t steps taken by a job.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..data.tokenizer import pad_rows
from ..inference.engine import Decoding
from ..inference.generate import generate
from ..inference.generation import GenerationConfig, next_token
from ..model.t5 import T5, DecodeCache, mean_pool

log = logging.getLogger("t5kit.serve")


class Rejected(Exception):
    """The scheduler takes no job now (queue full, shutting down, not loaded): HTTP 503."""


@dataclass(eq=False)
class Job:
    """One request. `ids`: token ids per input, truncated already. `emit(event)` gets, on the
    scheduler thread, ("piece", index, sequence, text) for streamed jobs, then ("done", result) or
    ("error", message). kind: "generate" or "embed" (then `pool` is "mean" or "none")."""
    kind: str
    ids: list[list[int]]
    emit: Callable[[tuple], None]
    cfg: GenerationConfig = field(default_factory=GenerationConfig)
    seed: int | None = None
    stream: bool = False
    pool: str = "mean"
    cancelled: bool = False

    def __post_init__(self):
        # `t5kit generate` (generate_texts) batches prompts longest first: the same row order
        # makes a seeded multi-input request draw the same samples
        self.order = sorted(range(len(self.ids)), key=lambda i: -len(self.ids[i]))

    @property
    def rows(self) -> int:
        """Decode-batch rows the job needs (beam jobs run apart, but no larger than a batch)."""
        return len(self.ids) * max(self.cfg.num_beams, self.cfg.num_return_sequences)

    @property
    def batched(self) -> bool:
        return self.kind == "generate" and self.cfg.num_beams == 1

    def padded(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs in `order`, right-padded: ids (B, S), mask (B, S)."""
        rows = [self.ids[i] for i in self.order]
        return pad_rows(rows, device=device)

    def result(self, tok, outputs: list[list[int]]) -> dict:
        """outputs: ids per row in `order` x num_return_sequences -> the answer in input order."""
        r = self.cfg.num_return_sequences
        texts: list[list[str]] = [[] for _ in self.ids]
        for row, ids in enumerate(outputs):
            texts[self.order[row // r]].append(tok.decode(ids))
        return {"outputs": texts, "usage": {"input_tokens": sum(map(len, self.ids)),
                                            "output_tokens": sum(map(len, outputs))}}


class Running:
    """A greedy / sampling job's rows in the decode batch: `alive` (row numbers in `order` x
    num_return_sequences, in batch order), their history (n, t + 1) with the start token, and
    every row's tokens so far."""

    def __init__(self, job: Job, start_token: int, device):
        self.job, self.cfg = job, job.cfg
        n = len(job.ids) * job.cfg.num_return_sequences
        self.alive = list(range(n))
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.sent = [""] * n  # text streamed so far per row
        self.history = torch.full((n, 1), start_token, dtype=torch.long, device=device)
        self.generator = None
        if job.cfg.do_sample:
            self.generator = torch.Generator(device=device)
            if job.seed is None:
                self.generator.seed()  # non-deterministic, and the global generator stays untouched
            else:
                self.generator.manual_seed(job.seed)

    def advance(self, token: torch.Tensor, eos: int) -> list[bool]:
        """token (n,) picked for the alive rows -> which of them keep running."""
        self.history = torch.cat([self.history, token[:, None]], 1)
        keep = []
        for row, t in zip(self.alive, token.tolist()):
            self.tokens[row].append(t)
            keep.append(t != eos and len(self.tokens[row]) < self.cfg.max_new_tokens)
        return keep

    def stream_pieces(self, tok, rows: list[int], final: list[bool]) -> None:
        """Emit each row's new text: the decoded ids so far minus what was sent. Held back while
        the text ends in an incomplete character (U+FFFD) or rewrites what was sent, unless the
        row just finished."""
        r = self.cfg.num_return_sequences
        for row, last in zip(rows, final):
            text = tok.decode(self.tokens[row])
            if not text.startswith(self.sent[row]) or (text.endswith("\ufffd") and not last):
                continue
            piece, self.sent[row] = text[len(self.sent[row]):], text
            if piece:
                self.job.emit(("piece", self.job.order[row // r], row % r, piece))


class Scheduler:
    """Owns the model on one thread. `submit` jobs from any thread; `close` stops admission;
    `stop` drains (finishes what was admitted and queued) and joins the thread."""

    def __init__(self, load: Callable[[], tuple[T5, object]], max_batch_size: int = 32, max_queue: int = 64):
        self.load, self.max_batch_size, self.max_queue = load, max_batch_size, max_queue
        self.cond = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.running: list[Running] = []
        self.cache: DecodeCache | None = None
        self.last: torch.Tensor | None = None  # (N, 1) each running row's last token
        self.accepting, self.stopping = True, False
        self.ready = threading.Event()
        self.failed: str | None = None
        self.on_fail: Callable[[], None] = lambda: None
        self.thread = threading.Thread(target=self._main, name="t5kit-scheduler", daemon=True)

    # ---- any thread ----

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; Rejected when not taking any now, ValueError when it could never fit."""
        if job.rows > self.max_batch_size:
            raise ValueError(f"{job.rows} sequences (inputs x num_return_sequences, or x num_beams) exceed "
                             f"--max-batch-size {self.max_batch_size}")
        with self.cond:
            if not self.accepting:
                raise Rejected("the server is shutting down")
            if not self.ready.is_set():
                raise Rejected("the model is loading")
            if len(self.waiting) >= self.max_queue:
                raise Rejected(f"the queue is full ({self.max_queue} requests waiting, --max-queue)")
            self.waiting.append(job)
            self.cond.notify()

    def close(self) -> None:
        """Stop admission. Lock-free: it runs in a signal handler, maybe while this thread holds the lock."""
        self.accepting = False

    def stop(self) -> None:
        with self.cond:
            self.accepting, self.stopping = False, True
            self.cond.notify()
        self.thread.join()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running_rows(self) -> int:
        return sum(len(r.alive) for r in self.running)

    # ---- the scheduler thread ----

    def _main(self) -> None:
        try:
            self.model, self.tok = self.load()
        except Exception as e:  # the server cannot serve: say why and let it exit
            self.failed = f"loading the model failed: {e}"
            log.error(self.failed)
            self.on_fail()
            return
        self.device = self.model.shared.weight.device
        self.ready.set()
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.waiting and not self.running:
                        if self.stopping:
                            return
                        self.cond.wait()
                    admitted = self._admit()
                for job in (j for j in admitted if not j.batched):
                    self._guard([job], lambda: self._run_alone(job))
                joining = [j for j in admitted if j.batched]
                if joining:
                    self._guard(joining, lambda: self._join(joining))
                if self.running:
                    self._guard([r.job for r in self.running], self._step)

    def _admit(self) -> list[Job]:
        """Pop waiting jobs FIFO while their rows fit next to the running ones (lock held)."""
        room = self.max_batch_size - self.running_rows
        out = []
        while self.waiting:
            job = self.waiting[0]
            if not job.cancelled and job.batched and job.rows > room:
                break
            self.waiting.popleft()
            if not job.cancelled:
                out.append(job)
                room -= job.rows if job.batched else 0
        return out

    def _guard(self, jobs: list[Job], fn: Callable[[], None]) -> None:
        """Run fn; if it raises, the jobs get the error and their rows leave, the server serves on.
        (A failed step fails every running job: the batch state is not trusted after it.)"""
        try:
            fn()
        except Exception as e:
            log.exception("request failed")
            for job in jobs:
                job.emit(("error", f"{type(e).__name__}: {e}"))
                job.cancelled = True
            failed, keep = set(map(id, jobs)), []
            for run in self.running:
                gone = id(run.job) in failed
                keep.extend([not gone] * len(run.alive))
                if gone:
                    run.alive = []
            self._keep(keep)

    def _run_alone(self, job: Job) -> None:
        """Beam search and embeddings: the whole job now, between two decode steps."""
        ids, mask = job.padded(self.device)
        if job.kind == "embed":
            hidden = self.model.encode(ids, mask)  # (B, S, C)
            if job.pool == "mean":
                vectors = mean_pool(hidden, mask).float().tolist()
            else:
                vectors = [h[:int(m.sum())].float().tolist() for h, m in zip(hidden, mask)]
            embeddings = [None] * len(job.ids)
            for row, i in enumerate(job.order):
                embeddings[i] = vectors[row]
            job.emit(("done", {"embeddings": embeddings, "usage": {"input_tokens": sum(map(len, job.ids))}}))
            return
        out = generate(self.model, ids, mask, config=job.cfg)
        pad = self.model.config.pad_token_id
        rows = [[t for t in row if t != pad] for row in out.tolist()]
        if job.stream:
            r = job.cfg.num_return_sequences
            for row, toks in enumerate(rows):
                text = self.tok.decode(toks)
                if text:
                    job.emit(("piece", job.order[row // r], row % r, text))
        job.emit(("done", job.result(self.tok, rows)))

    def _join(self, jobs: list[Job]) -> None:
        """Encode the new jobs' inputs in one pass and append their rows to the running batch."""
        rows = [job.ids[i] for job in jobs for i in job.order]
        ids, mask = pad_rows(rows, device=self.device)
        memory = self.model.encode(ids, mask)  # (B, S, C)
        repeat = torch.tensor([job.cfg.num_return_sequences for job in jobs for _ in job.ids], device=self.device)
        memory, mask = memory.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)
        cache = self.model.new_cache(memory, mask, max(job.cfg.max_new_tokens for job in jobs))
        start = self.model.config.decoder_start_token_id
        new = [Running(job, start, self.device) for job in jobs]
        first = torch.full((len(memory), 1), start, dtype=torch.long, device=self.device)
        # the batch state changes only here, after everything that may fail
        self.cache = cache if self.cache is None else DecodeCache.cat([self.cache, cache])
        self.last = first if self.last is None else torch.cat([self.last, first])
        self.running.extend(new)

    def _step(self) -> None:
        """One decode step for every running row (N, 1) -> tokens; finished rows leave."""
        eos = self.model.config.eos_token_id
        logits = Decoding(self.model, self.cache)(self.last)  # (N, V) fp32
        picked, keep, lo = [], [], 0
        for run in self.running:
            cancelled = run.job.cancelled  # read once: the HTTP side may set it at any time
            n = len(run.alive)
            picked.append(next_token(run.cfg, run.history, logits[lo:lo + n], eos, run.generator))
            lo += n
            alive = run.alive
            kept = run.advance(picked[-1], eos)
            if run.job.stream and not cancelled:
                run.stream_pieces(self.tok, alive, [not k for k in kept])
            if cancelled:
                kept = [False] * n
            elif not any(kept):
                run.job.emit(("done", run.job.result(self.tok, run.tokens)))
            run.history = run.history[torch.tensor(kept, device=self.device)]
            run.alive = [row for row, k in zip(alive, kept) if k]
            keep.extend(kept)
        self.last = torch.cat(picked)[:, None]
        self._keep(keep)

    def _keep(self, keep: list[bool]) -> None:
        """Keep the running rows marked True (N flags in batch order; each job's `alive` already
        says the same): drop the others from the cache, and jobs left with no rows from the batch."""
        if all(keep):
            return
        rows = torch.tensor(keep, device=self.device).nonzero().squeeze(1)
        self.running = [r for r in self.running if r.alive]
        if not self.running:
            self.cache = self.last = None
            return
        self.cache.select(rows)
        self.last = self.last[rows]
        self.cache.truncate(max(r.cfg.max_new_tokens for r in self.running))

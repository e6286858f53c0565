"""Continuous batching for `t5kit serve`: one thread owns the model; requests join the running
decode at the next step and leave the moment they finish or are cancelled.

Each iteration of the scheduler thread:
1. admits waiting jobs first in, first out while their decode rows fit in `max_batch_size`
   (inputs x num_return_sequences, or x num_beams; a job that does not fit waits, and so does
   everything behind it: FIFO; embed jobs hold no decode rows);
2. encodes the admitted greedy / sampling jobs in one encoder pass and appends their rows to the
   shared `DecodeCache` (`DecodeCache.cat`: each row keeps its own position, so rows at different
   steps share one decode step); starts each beam job as a group of its own (`engine.start`, as
   `t5kit generate` decodes it: a beam group reorders its rows every step, which the shared cache
   cannot do for some rows only); queues embed jobs;
3. encodes one chunk of the oldest embed job, at most `ENCODE_TOKENS` padded tokens, so an embed
   request delays the decode step by a chunk, not by its whole input (the encoder treats rows
   independently: chunking changes nothing but float rounding);
4. `_step`: one decode step of the shared batch and of every beam group. Each greedy / sampling
   job picks its rows' tokens with its own GenerationConfig (`generation.next_token`; sampling
   with its own noise table, `generation.sampling_noise`, drawn from its seed as `generate`
   draws it), each beam group takes one `beam.BeamSearch.advance`. Then one device-to-host copy
   brings every new token, every group's stop flag and the outputs of the groups that stopped at
   the step before: the step's only host sync. What finished, the streamed text (`TextStream`,
   incremental) and which rows leave are decided on the host; the rows to keep go back to the
   device pinned and non-blocking (`generation.upload`), and the finished or cancelled rows leave.

Jobs talk to the HTTP side through `Job.emit`, called on this thread; server.py hands each event
to its event loop (`loop.call_soon_threadsafe`). The HTTP side cancels a job (timeout, client
gone) by setting `Job.cancelled`; its rows (beam groups included) leave at the next step, an
embed job before its next chunk.

What one request is and how its rows advance (`Job`, `Running`, `BeamRun`) is in requests.py;
this module is the thread: admission and the batched step loop.

Shapes: N rows in the shared batch, V vocabulary.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

import torch

from ..data.tokenizer import pad_rows
from ..inference import engine
from ..inference.generation import upload
from ..model.cache import DecodeCache
from ..model.t5 import T5, mean_pool
from .requests import BeamRun, Job, Rejected, Running, index

log = logging.getLogger("t5kit.serve")

# padded tokens of an embed job encoded between two decode steps: eight inputs at the default
# --max-input-tokens, what a join of eight such generate requests encodes in one pass already
ENCODE_TOKENS = 4096


class Scheduler:
    """Owns the model on one thread. `submit` jobs from any thread; `close` stops admission;
    `stop` drains (finishes what was admitted and queued) and joins the thread."""

    def __init__(self, load: Callable[[], tuple[T5, object]], max_batch_size: int = 32, max_queue: int = 64):
        self.load, self.max_batch_size, self.max_queue = load, max_batch_size, max_queue
        self.cond = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.running: list[Running] = []  # the shared batch, in batch order
        self.cache: DecodeCache | None = None
        self.last: torch.Tensor | None = None  # (N, 1) each shared row's last token
        self.beams: list[BeamRun] = []  # stepping
        self.stopped: list[tuple[BeamRun, tuple]] = []  # stopped: (group, its output), fetched at the next step
        self.embeds: deque[tuple[Job, list]] = deque()  # (job, its vectors so far in `order`)
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
        return sum(len(r.alive) for r in self.running) + sum(b.rows for b in self.beams)

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
                    while not (self.waiting or self.running or self.beams or self.stopped or self.embeds):
                        if self.stopping:
                            return
                        self.cond.wait()
                    admitted = self._admit()
                self._start(admitted)
                if self.embeds:
                    job = self.embeds[0][0]
                    self._guard([job], self._embed_chunk)
                if self.running or self.beams or self.stopped:
                    jobs = [r.job for r in self.running] + [b.job for b in self.beams + [s[0] for s in self.stopped]]
                    self._guard(jobs, self._step)

    def _admit(self) -> list[Job]:
        """Pop waiting jobs FIFO while their decode rows fit next to the running ones (lock held)."""
        room = self.max_batch_size - self.running_rows
        out = []
        while self.waiting:
            job = self.waiting[0]
            decodes = job.kind == "generate"
            if not job.cancelled and decodes and job.rows > room:
                break
            self.waiting.popleft()
            if not job.cancelled:
                out.append(job)
                room -= job.rows if decodes else 0
        return out

    def _start(self, jobs: list[Job]) -> None:
        """Greedy / sampling jobs join the shared batch, beam jobs start their groups, embed jobs queue."""
        joining = [j for j in jobs if j.kind == "generate" and j.cfg.num_beams == 1]
        if joining:
            self._guard(joining, lambda: self._join(joining))
        for job in jobs:
            if job.kind == "embed":
                self.embeds.append((job, []))
            elif job.cfg.num_beams > 1:
                self._guard([job], lambda job=job: self.beams.append(BeamRun(job, self.model, self.device)))

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
            self.beams = [b for b in self.beams if id(b.job) not in failed]
            self.stopped = [s for s in self.stopped if id(s[0].job) not in failed]
            self.embeds = deque(e for e in self.embeds if id(e[0]) not in failed)

    def _embed_chunk(self) -> None:
        """Encode the next rows of the oldest embed job: as many as fit in ENCODE_TOKENS padded
        tokens (at least one; rows go longest first, so the first sets the padded length)."""
        job, vectors = self.embeds[0]
        if job.cancelled:
            self.embeds.popleft()
            return
        lo = len(vectors)
        n = max(1, ENCODE_TOKENS // len(job.ids[job.order[lo]]))
        ids, mask = job.padded(self.device, slice(lo, lo + n))
        hidden = self.model.encode(ids, mask)  # (b, S, C)
        if job.pool == "mean":
            vectors.extend(mean_pool(hidden, mask).float().tolist())  # the chunk's one host sync
        else:
            lengths = [len(job.ids[i]) for i in job.order[lo:lo + n]]
            vectors.extend(h[:k] for h, k in zip(hidden.float().tolist(), lengths))
        if len(vectors) == len(job.ids):
            self.embeds.popleft()
            embeddings = [None] * len(job.ids)
            for row, i in enumerate(job.order):
                embeddings[i] = vectors[row]
            job.emit(("done", {"embeddings": embeddings, "usage": job.usage()}))

    def _join(self, jobs: list[Job]) -> None:
        """Encode the new jobs' inputs in one pass and append their rows to the shared batch."""
        rows = [job.ids[i] for job in jobs for i in job.order]
        ids, mask = (upload(x, self.device) for x in pad_rows(rows))
        memory = self.model.encode(ids, mask)  # (B, S, C)
        # each input once per returned sequence, by an index built on the host (no sync)
        repeat = [k for k, r in enumerate(job.cfg.num_return_sequences for job in jobs for _ in job.ids)
                  for _ in range(r)]
        repeat = upload(torch.tensor(repeat, dtype=torch.long), self.device)
        memory, mask = memory.index_select(0, repeat), mask.index_select(0, repeat)
        cache = self.model.new_cache(memory, mask, max(job.cfg.max_new_tokens for job in jobs))
        start = self.model.config.decoder_start_token_id
        new = [Running(job, self.tok, start, self.device) for job in jobs]
        first = torch.full((len(memory), 1), start, dtype=torch.long, device=self.device)
        # the batch state changes only here, after everything that may fail
        self.cache = cache if self.cache is None else DecodeCache.cat([self.cache, cache])
        self.last = first if self.last is None else torch.cat([self.last, first])
        self.running.extend(new)

    def _step(self) -> None:
        """One decode step for every running row, with one host sync; finished and cancelled rows leave."""
        eos = self.model.config.eos_token_id
        self.beams = [b for b in self.beams if not b.job.cancelled]  # their rows leave now
        self.stopped = [s for s in self.stopped if not s[0].job.cancelled]
        if not (self.running or self.beams or self.stopped):
            return
        fetch = []  # int64 device tensors, brought to the host in one copy
        if self.running:
            logits = engine.Decoding(self.model, self.cache)(self.last)  # (N, V) fp32
            picked, lo = [], 0
            for run in self.running:
                picked.append(run.pick(logits[lo:lo + len(run.alive)], eos))
                lo += len(run.alive)
            self.last = torch.cat(picked)[:, None]
            fetch.append(self.last.view(-1))
        fetch += [b.advance() for b in self.beams]
        fetch += [torch.cat([out.view(-1), lengths]) for _, (out, lengths) in self.stopped]
        values = torch.cat(fetch).tolist()  # the step's one host sync

        keep, lo = [], 0
        for run in self.running:
            cancelled = run.job.cancelled  # read once: the HTTP side may set it at any time
            n = len(run.alive)
            kept = [False] * n if cancelled else run.advance(values[lo:lo + n], eos)
            lo += n
            if not any(kept):
                run.alive = []
                if not cancelled:
                    run.job.emit(("done", run.job.result(self.tok, run.tokens)))
            elif not all(kept):
                run.select(kept)
            keep.extend(kept)
        flags, lo = values[lo:lo + len(self.beams)], lo + len(self.beams)
        for beam, _ in self.stopped:
            size = beam.search.b * beam.job.cfg.num_return_sequences * (beam.search.m + 1)
            beam.finish(self.tok, values[lo:lo + size])
            lo += size
        self.stopped = [(b, b.search.output()) for b, stop in zip(self.beams, flags) if stop]
        self.beams = [b for b, stop in zip(self.beams, flags) if not stop]
        self._keep(keep)

    def _keep(self, keep: list[bool]) -> None:
        """Keep the shared rows marked True (N flags in batch order; each job's `alive` already
        says the same): drop the others from the cache, and jobs left with no rows from the batch."""
        if all(keep):
            return
        self.running = [r for r in self.running if r.alive]
        if not self.running:
            self.cache = self.last = None
            return
        rows = upload(index(keep), self.device)
        self.cache.select(rows)
        self.last = self.last.index_select(0, rows)
        self.cache.truncate(max(r.cfg.max_new_tokens for r in self.running))

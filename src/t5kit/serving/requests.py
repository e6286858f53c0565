"""What one request is and how its rows advance, apart from the thread that batches them.

`Job` is one request as the HTTP side (server.py) builds it and the scheduler admits it; `Rejected`
is the scheduler's refusal to take one. A greedy / sampling job's rows in the shared batch are a
`Running` (its tokens picked with its own GenerationConfig and noise table, its text streamed); a
beam job is a `BeamRun`, a group with its own decode step and `BeamSearch`. Each keeps its own
rows' state (on the device and on the host) and knows how they advance by one token; which rows
share a step, when they join and when they leave is the scheduler thread's (scheduler.py).

Shapes: n a job's rows, V vocabulary, M a job's max_new_tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..data.tokenizer import pad_rows
from ..inference import engine
from ..inference.beam import BeamSearch
from ..inference.generate import TextStream
from ..inference.generation import GenerationConfig, next_token, sampling_noise, upload
from ..model.t5 import T5


class Rejected(Exception):
    """The scheduler takes no job now (queue full, shutting down, not loaded): HTTP 503."""


@dataclass(eq=False)
class Job:
    """One request. `ids`: token ids per input, truncated already (`truncated` of them). `emit(event)`
    gets, on the scheduler thread, ("piece", index, sequence, text) for streamed jobs, then
    ("done", result) or ("error", message). kind: "generate" or "embed" (then `pool` is "mean" or
    "none")."""
    kind: str
    ids: list[list[int]]
    emit: Callable[[tuple], None]
    cfg: GenerationConfig = field(default_factory=GenerationConfig)
    seed: int | None = None
    stream: bool = False
    pool: str = "mean"
    truncated: int = 0
    cancelled: bool = False

    def __post_init__(self):
        # `t5kit generate` (generate_texts) batches prompts longest first: the same row order
        # gives a seeded multi-input request the same rows of its noise table
        self.order = sorted(range(len(self.ids)), key=lambda i: -len(self.ids[i]))

    @property
    def rows(self) -> int:
        """Decode rows the job needs."""
        return len(self.ids) * max(self.cfg.num_beams, self.cfg.num_return_sequences)

    def padded(self, device, rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs in `order` (those in `rows` of it), right-padded: ids (B, S), mask (B, S)."""
        return tuple(upload(x, device) for x in pad_rows([self.ids[i] for i in self.order[rows]]))

    def usage(self, **counts) -> dict:
        return {"input_tokens": sum(map(len, self.ids)), **counts, "truncated_inputs": self.truncated}

    def result(self, tok, outputs: list[list[int]]) -> dict:
        """outputs: ids per row in `order` x num_return_sequences -> the answer in input order."""
        r = self.cfg.num_return_sequences
        texts: list[list[str]] = [[] for _ in self.ids]
        for row, ids in enumerate(outputs):
            texts[self.order[row // r]].append(tok.decode(ids))
        return {"outputs": texts, "usage": self.usage(output_tokens=sum(map(len, outputs)))}


class Running:
    """A greedy / sampling job's rows in the shared batch: `alive` (row numbers in `order` x
    num_return_sequences, in batch order), their history (n, 1 + M) from the start token and
    noise table (n, M) on the device, and every row's tokens (and text stream) on the host."""

    def __init__(self, job: Job, tok, start_token: int, device):
        self.job, self.cfg = job, job.cfg
        n = len(job.ids) * job.cfg.num_return_sequences
        self.alive = list(range(n))
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.texts = [TextStream(tok) for _ in range(n)] if job.stream else None
        self.history = torch.full((n, 1 + job.cfg.max_new_tokens), start_token, dtype=torch.long, device=device)
        self.noise = sampling_noise(job.cfg, n, _generator(job.seed) if job.cfg.do_sample else None, device)
        self.t = 0

    def pick(self, logits: torch.Tensor, eos: int) -> torch.Tensor:
        """logits (n, V) of the alive rows -> (n,) their tokens, on the device."""
        noise = None if self.noise is None else self.noise[:, self.t]
        token = next_token(self.cfg, self.history[:, :self.t + 1], logits, eos, noise)
        self.history[:, self.t + 1] = token
        self.t += 1
        return token

    def advance(self, tokens: list[int], eos: int) -> list[bool]:
        """The alive rows' new tokens, on the host -> which of them keep running; streams the new
        text of each row (its last piece when it ends)."""
        keep = []
        for row, t in zip(self.alive, tokens):
            self.tokens[row].append(t)
            keep.append(t != eos and len(self.tokens[row]) < self.cfg.max_new_tokens)
            if self.texts is not None:
                piece = self.texts[row].push(t) + ("" if keep[-1] else self.texts[row].finish())
                if piece:
                    r = self.cfg.num_return_sequences
                    self.job.emit(("piece", self.job.order[row // r], row % r, piece))
        return keep

    def select(self, keep: list[bool]) -> None:
        """Keep the alive rows marked True."""
        idx = upload(index(keep), self.history.device)
        self.history = self.history.index_select(0, idx)
        self.noise = None if self.noise is None else self.noise.index_select(0, idx)
        self.alive = [row for row, k in zip(self.alive, keep) if k]


class BeamRun:
    """A beam job's group: its own decode step over its B x num_beams rows, and its BeamSearch."""

    def __init__(self, job: Job, model: T5, device):
        self.job, cfg = job, job.cfg
        ids, mask = job.padded(device)
        self.search = BeamSearch(cfg, len(job.ids), model.config, device)
        self.decoding = engine.start(model, ids, mask, cfg.num_beams, cfg.max_new_tokens)
        self.rows = len(job.ids) * cfg.num_beams

    def advance(self) -> torch.Tensor:
        """One step -> (1,) the stop flag, on the device."""
        parent = self.search.advance(self.decoding(self.search.tokens))
        self.decoding.select(parent, cross_too=False)
        return self.search.stopped().long().view(1)

    def finish(self, tok, values: list[int]) -> None:
        """values: the flattened output ids (B * r, M) then lengths (B * r,) -> stream and answer."""
        job, m = self.job, self.search.m
        n = len(values) // (m + 1)
        rows = [values[i * m:i * m + length] for i, length in enumerate(values[n * m:])]
        if job.stream:
            r = job.cfg.num_return_sequences
            for row, ids in enumerate(rows):
                if text := tok.decode(ids):
                    job.emit(("piece", job.order[row // r], row % r, text))
        job.emit(("done", job.result(tok, rows)))


def index(keep: list[bool]) -> torch.Tensor:
    """The positions marked True, as a CPU index tensor."""
    return torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long)


def _generator(seed: int | None) -> torch.Generator:
    """A request's own CPU generator (the global one stays untouched): seeded, or at random."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g

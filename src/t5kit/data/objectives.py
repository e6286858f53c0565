"""Pretraining objectives: how one raw segment becomes (inputs, targets) (issue 20).

- `span`: T5's span corruption (r = 0.15, mean span 3, no mode token), the default.
- `ul2`: UL2's mixture of seven denoisers (Tay et al. 2022, "UL2: Unifying Language Learning
  Paradigms", section 3.1.2; T5_REFERENCE.md, "UL2's mixture of denoisers"). R and X corrupt spans
  with seqio's arithmetic (spans.py); S is a prefix LM. Each example's inputs start with its mode
  token, spelled as the released UL2 checkpoints spell them: [NLU] (R), [NLG] (X), [S2S] (S).
- `prefix-lm`: the S denoiser alone, without a mode token.

Lengths: each denoiser takes at most `raw_length` tokens, fitted (`Denoiser.fit`) so that its
inputs fit the inputs length (--seq-length) and its targets the targets length
(--decoder-seq-length), so no example is ever cut. The data is cut into segments of the longest raw
length of the mixture (`Objective.segment_length`) and an example's denoiser takes the first
`raw_length` tokens of its segment (seqio's `split_tokens` keeps the start too); the rest of that
segment is unused in that epoch (`Objective.token_share` is the expected share used).

Every function is pure: a denoiser is drawn and applied with the Generator it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .spans import fit_lengths, random_spans_noise_mask, sentinel_pair

MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")
OBJECTIVES = ("span", "ul2", "prefix-lm")
S_TARGET_SHARE = 0.25  # UL2's S denoiser: the target is on average a quarter of the segment (issue 20)


@dataclass(frozen=True)
class Denoiser:
    """One denoiser. rate: the corruption rate r (S: the mean share of the segment in its targets);
    mean_span: the mean noise span length mu (S: None, the targets are one span at the end).
    After `fit`: it takes at most `raw_length` raw tokens and makes inputs of at most
    `inputs_length` and targets of at most `targets_length` tokens (mode token and EOS counted)."""
    name: str
    mode: str | None
    rate: float
    mean_span: float | None
    mode_id: int | None = None
    first_sentinel: int = 0
    eos: int = 1
    raw_length: int = 0
    inputs_length: int = 0
    targets_length: int = 0

    def fit(self, inputs_length: int, targets_length: int | None = None, sentinels: int | None = None) -> Denoiser:
        """This denoiser with the longest raw length whose examples fit (inputs_length,
        targets_length) and need at most `sentinels` sentinels (`spans.fit_lengths`); None: no limit
        (targets as seqio's `random_spans_helper` gives them, within the inputs length).

        >>> ul2 = {d.name: d for d in UL2}
        >>> [(d.raw_length, d.inputs_length, d.targets_length) for d in (ul2["R1"].fit(512), ul2["S"].fit(512, 114))]
        [(567, 512, 114), (227, 228, 114)]
        """
        room = inputs_length - (self.mode is not None)  # the mode token comes first
        if self.mean_span is None:
            # S: the longest inputs (a 1-token target) are the raw tokens - 1 + EOS; the longest
            # targets (raw // 2 tokens, see `corrupt`) + EOS must fit targets_length
            raw = room if targets_length is None else min(room, 2 * targets_length - 1)
            inputs, targets = raw, raw // 2 + 1
        else:
            raw, inputs, targets = fit_lengths(room, targets_length, self.rate, self.mean_span, sentinels)
        if raw < 2 or inputs > room or (targets_length is not None and targets > targets_length):
            raise ValueError(f"inputs length {inputs_length} and targets length {targets_length} leave no room for "
                             f"denoiser {self.name} (rate {self.rate}, mean span {self.mean_span}); expected longer "
                             "lengths")
        return replace(self, raw_length=raw, inputs_length=inputs + (self.mode is not None), targets_length=targets)

    def corrupt(self, raw: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
        """The first `raw_length` tokens of a segment -> (inputs, targets, info), each ending in EOS,
        inputs led by the mode token. info: noise_tokens (raw tokens moved to the targets),
        kept_tokens (raw tokens left in the inputs), spans (noise spans).

        R / X (seqio `random_spans_noise_mask`, `noise_span_to_unique_sentinel`):
          inputs = [mode] nn1 S0 nn2 S1 ... EOS, targets = S0 n1 S1 n2 ... EOS.
        S (prefix LM): the last t tokens are the targets, t drawn uniformly from 1 .. n // 2 for a
          segment of n tokens, so t / n is 1/4 on average; no sentinel anywhere:
          inputs = [mode] x1 .. x(n-t) EOS, targets = x(n-t+1) .. xn EOS.
        """
        raw = np.asarray(raw[:self.raw_length], dtype=np.int64)
        n = len(raw)
        if self.mean_span is None:
            t = int(rng.integers(1, max(n // 2, 1) + 1))
            inputs, targets = np.append(raw[:n - t], self.eos), np.append(raw[n - t:], self.eos)
            info = {"noise_tokens": t, "kept_tokens": n - t, "spans": 1}
        else:
            mask = random_spans_noise_mask(n, rng, self.rate, self.mean_span)
            inputs, targets = sentinel_pair(raw, mask, self.first_sentinel, self.eos)
            starts = mask & ~np.concatenate([[False], mask[:-1]])
            info = {"noise_tokens": int(mask.sum()), "kept_tokens": int(n - mask.sum()), "spans": int(starts.sum())}
        if self.mode_id is not None:
            inputs = np.concatenate([[self.mode_id], inputs])
        return inputs, targets, info


SPAN = Denoiser("span", None, 0.15, 3.0)
# UL2 section 3.1.2 and T5_REFERENCE.md: (mu, r) and the mode token of each denoiser
UL2 = (Denoiser("R1", "[NLU]", 0.15, 3.0), Denoiser("R2", "[NLU]", 0.15, 8.0),
       Denoiser("X1", "[NLG]", 0.5, 3.0), Denoiser("X2", "[NLG]", 0.5, 8.0),
       Denoiser("X3", "[NLG]", 0.15, 64.0), Denoiser("X4", "[NLG]", 0.5, 64.0),
       Denoiser("S", "[S2S]", S_TARGET_SHARE, None))
PREFIX_LM = Denoiser("S", None, S_TARGET_SHARE, None)


@dataclass(frozen=True)
class Objective:
    """The denoisers of an objective (those with a positive rate), fitted to one inputs / targets
    shape, and their mixing rates (summing to 1)."""
    name: str
    denoisers: tuple[Denoiser, ...]
    rates: tuple[float, ...]
    inputs_length: int

    @property
    def segment_length(self) -> int:
        """Raw tokens per segment: the longest any denoiser takes."""
        return max(d.raw_length for d in self.denoisers)

    @property
    def targets_length(self) -> int:
        """The batches' targets length: the longest targets any denoiser makes."""
        return max(d.targets_length for d in self.denoisers)

    @property
    def token_share(self) -> float:
        """The expected share of a full segment's tokens that its example uses."""
        return sum(r * d.raw_length for r, d in zip(self.rates, self.denoisers)) / self.segment_length

    def pick(self, rng: np.random.Generator) -> Denoiser:
        """A denoiser drawn with the mixing rates (one draw from rng; none for a single denoiser,
        so the `span` stream is the one span corruption gave before objectives existed)."""
        if len(self.denoisers) == 1:
            return self.denoisers[0]
        return self.denoisers[int(np.searchsorted(np.cumsum(self.rates)[:-1], rng.random(), side="right"))]

    def example(self, raw: np.ndarray, rng: np.random.Generator) -> tuple[Denoiser, np.ndarray, np.ndarray, dict]:
        """One segment -> (its denoiser, inputs, targets, info): the denoiser drawn, then applied,
        with the same Generator."""
        d = self.pick(rng)
        return (d, *d.corrupt(raw, rng))


def parse_rates(items: list[str] | None) -> dict[str, float] | None:
    """--denoiser-rates NAME=WEIGHT ... -> {name: weight}; names UL2's (R1 R2 X1 X2 X3 X4 S), weights
    non-negative numbers, normalised later; unnamed denoisers get 0.

    >>> parse_rates(["R1=1", "S=3"])
    {'R1': 1.0, 'S': 3.0}
    """
    if not items:
        return None
    names = [d.name for d in UL2]
    out = {}
    for item in items:
        name, eq, weight = item.partition("=")
        try:
            value = float(weight) if eq else -1.0
        except ValueError:
            value = -1.0
        if name not in names or not value >= 0 or name in out or value == float("inf"):
            raise ValueError(f"--denoiser-rates {item!r}: expected NAME=WEIGHT once per name, NAME one of "
                             f"{' '.join(names)} and WEIGHT a finite number >= 0")
        out[name] = value
    if not sum(out.values()) > 0:
        raise ValueError(f"--denoiser-rates {' '.join(items)}: expected at least one positive weight")
    return out


def check_objective(name: str, rates: dict[str, float] | None = None) -> None:
    """A ValueError unless `name` is an objective and `rates` (`parse_rates`) fit it."""
    if name not in OBJECTIVES:
        raise ValueError(f"--objective {name!r}: expected one of {', '.join(OBJECTIVES)}")
    if rates is not None and name != "ul2":
        raise ValueError(f"--denoiser-rates applies to --objective ul2, not {name}")


def build_objective(name: str, inputs_length: int, targets_length: int | None = None,
                    rates: dict[str, float] | None = None, *, first_sentinel: int, eos: int = 1,
                    mode_ids: dict[str, int] | None = None, sentinels: int | None = None) -> Objective:
    """The objective `name` (span | ul2 | prefix-lm) fitted to inputs_length and targets_length
    (None: as long as each denoiser needs) and to the tokenizer's number of `sentinels` (None: no
    limit). ul2: `rates` by denoiser name (default: the paper's, uniform over the seven, as its
    `ul2_objective` leaves `rates=None` to tf.data's `sample_from_datasets`, NeMo issue #5655) and
    `mode_ids` (the tokenizer's ids of MODE_TOKENS)."""
    check_objective(name, rates)
    if name == "ul2":
        missing = [m for m in MODE_TOKENS if m not in (mode_ids or {})]
        if missing:
            raise ValueError(f"--objective ul2 needs the tokenizer's ids of the mode tokens {', '.join(missing)}")
        weights = [1.0 if rates is None else rates.get(d.name, 0.0) for d in UL2]
        chosen = [replace(d, mode_id=mode_ids[d.mode]) for d, w in zip(UL2, weights) if w > 0]
        weights = [w for w in weights if w > 0]
    else:
        chosen, weights = [SPAN if name == "span" else PREFIX_LM], [1.0]
    fitted = tuple(replace(d, first_sentinel=first_sentinel, eos=eos).fit(inputs_length, targets_length, sentinels)
                   for d in chosen)
    return Objective(name, fitted, tuple(w / sum(weights) for w in weights), inputs_length)


def span_objective(inputs_length: int, first_sentinel: int, eos: int = 1, noise_density: float = 0.15,
                   mean_span: float = 3.0) -> Objective:
    """T5's span corruption with any noise density and mean span length (`DataConfig`'s), its raw
    length `random_spans_helper`'s for inputs_length (`Denoiser.fit`), no limit on its sentinels."""
    d = replace(SPAN, rate=noise_density, mean_span=mean_span, first_sentinel=first_sentinel, eos=eos)
    return Objective("span", (d.fit(inputs_length),), (1.0,), inputs_length)


def example_record(d: Denoiser, inputs: np.ndarray, targets: np.ndarray, info: dict, decode) -> dict:
    """One example as `t5kit pretrain --show-examples` prints it (issue 20's format); `decode` maps
    ids to text with the special tokens shown.

    >>> d = replace(UL2[-1], mode_id=99).fit(8)  # S: at most 7 raw tokens, inputs led by [S2S] (id 99 here)
    >>> r = example_record(d, *d.corrupt(np.arange(10, 20), np.random.default_rng(0)), str)
    >>> r["inputs"], r["targets"], r["noise_tokens"], r["kept_tokens"], r["spans"]
    ([99, 10, 11, 12, 13, 1], [14, 15, 16, 1], 3, 4, 1)
    """
    return {"denoiser": d.name, "mode": d.mode, "rate": d.rate, "mean_span": d.mean_span,
            "inputs": inputs.tolist(), "targets": targets.tolist(), "inputs_text": decode(inputs),
            "targets_text": decode(targets), **info}

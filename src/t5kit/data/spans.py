"""T5 span corruption exactly as the T5 library / seqio does it (t5/data/preprocessors.py:
`random_spans_helper`, `random_spans_noise_mask`, `noise_span_to_unique_sentinel`), in numpy with
an explicit `np.random.Generator`. Pure functions; see T5_REFERENCE.md section 4. UL2's denoisers
(objectives.py) are built from these primitives.
"""

from __future__ import annotations

import numpy as np


def noise_and_spans(length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(noise tokens, noise spans) that `random_spans_noise_mask` draws for `length` >= 2 tokens:
    round(length r), at least 1 and at most length - 1, in round(noise / mu) spans, at least 1.
    (`random_spans_helper` counts without these bounds: at inputs 128, (r=0.15, mu=64) would then
    count 0 spans where the mask makes 1.)

    >>> noise_and_spans(568), noise_and_spans(148, 0.15, 64.0)
    ((85, 28), (22, 1))
    """
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    return num_noise, max(int(round(num_noise / mean_noise_span_length)), 1)


def corrupted_lengths(raw_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """(inputs, targets) lengths, EOS included, after corrupting `raw_length` tokens.

    >>> corrupted_lengths(568)
    (512, 114)
    """
    num_noise = int(round(raw_length * noise_density))
    num_spans = int(round(num_noise / mean_noise_span_length))
    return raw_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def random_spans_helper(inputs_length: int, noise_density: float = 0.15,
                        mean_noise_span_length: float = 3.0) -> tuple[int, int]:
    """Largest raw segment length whose corrupted inputs (with EOS) fit `inputs_length`, and the
    resulting targets length (preprocessors.py `random_spans_helper`).

    >>> [random_spans_helper(n) for n in (128, 256, 512, 1024)]
    [(141, 29), (284, 58), (568, 114), (1137, 229)]
    """
    tokens_length = inputs_length - 1
    while corrupted_lengths(tokens_length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = corrupted_lengths(tokens_length, noise_density, mean_noise_span_length)
    if noise_density == 0.5 and targets_length > inputs_length:  # the reference's "minor hack"
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def fit_lengths(inputs_length: int, targets_length: int | None = None, noise_density: float = 0.15,
                mean_noise_span_length: float = 3.0, max_spans: int | None = None) -> tuple[int, int, int]:
    """(raw, inputs, targets) lengths, EOS included: `random_spans_helper`'s raw length, shortened
    while, counted as the mask counts (`noise_and_spans`), its corrupted inputs would exceed
    `inputs_length`, its targets `targets_length` or its noise spans the `max_spans` sentinels
    (None: no limit); and the lengths a raw segment of that length becomes.
    They and the span count grow with the raw length, so no shorter segment is cut either (issue
    20: UL2's denoisers share one inputs / targets shape). Past the last sentinel seqio would count
    down into ordinary ids (`noise_span_to_unique_sentinel`): at inputs 512, (r=0.5, mu=3) gives
    127 spans, and T5 has 100 sentinels.

    >>> fit_lengths(512), fit_lengths(512, 64), fit_lengths(511, None, 0.5, 64.0)
    ((568, 512, 114), (316, 286, 64), (1004, 511, 511))
    >>> fit_lengths(511, None, 0.5, 3.0), fit_lengths(511, None, 0.5, 3.0, max_spans=100)
    ((765, 511, 510), (602, 402, 402))
    >>> random_spans_helper(127, 0.15, 64.0), fit_lengths(127, None, 0.15, 64.0)
    ((148, 23), (147, 127, 24))
    """
    raw, _ = random_spans_helper(inputs_length, noise_density, mean_noise_span_length)

    def lengths(n: int) -> tuple[int, int, int]:
        noise, spans = noise_and_spans(n, noise_density, mean_noise_span_length)
        return n - noise + spans + 1, noise + spans + 1, spans
    while raw > 2:
        inputs, targets, spans = lengths(raw)
        if inputs <= inputs_length and (targets_length is None or targets <= targets_length) and \
                (max_spans is None or spans <= max_spans):
            break
        raw -= 1
    return (raw, *lengths(raw)[:2])


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Split num_items into num_segments non-empty parts uniformly at random -> lengths."""
    first_in_segment = np.zeros(num_items, dtype=np.int64)
    first_in_segment[1:] = rng.permutation((np.arange(num_items - 1) < num_segments - 1).astype(np.int64))
    segment_id = np.cumsum(first_in_segment)
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, rng: np.random.Generator, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> np.ndarray:
    """Boolean mask, True = noise. Spans interleave starting with non-noise, so the mask always
    ends in a noise span (random_roll=False, the reference default).

    >>> m = random_spans_noise_mask(20, np.random.default_rng(0))
    >>> int(m.sum()), bool(m[0]), bool(m[-1])
    (3, False, True)
    """
    orig_length = length
    length = max(length, 2)
    num_noise, num_spans = noise_and_spans(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    span_start = np.zeros(length, dtype=np.int64)
    span_start[np.cumsum(interleaved)[:-1]] = 1
    return (np.cumsum(span_start) % 2 == 1)[:orig_length]


def noise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray, first_sentinel: int) -> np.ndarray:
    """Replace each noise span by one sentinel, counting down from `first_sentinel`; drop the rest.

    >>> noise_span_to_unique_sentinel(np.array([5, 6, 7, 8, 9]), np.array([0, 1, 1, 0, 1], bool), 99).tolist()
    [5, 99, 8, 98]
    """
    prev_noise = np.concatenate([[False], noise_mask[:-1]])
    first = noise_mask & ~prev_noise
    sentinels = first_sentinel + 1 - np.cumsum(first)
    return np.where(first, sentinels, tokens)[~(noise_mask & prev_noise)]


def sentinel_pair(tokens: np.ndarray, noise_mask: np.ndarray, first_sentinel: int,
                  eos: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and their noise mask -> (inputs, targets), each ending in EOS:
    inputs = nn1 S0 nn2 S1 ... + EOS (`noise_span_to_unique_sentinel`), targets = S0 n1 S1 n2 ... + EOS
    (`nonnoise_span_to_unique_sentinel`, the same on the complement).

    >>> [x.tolist() for x in sentinel_pair(np.array([5, 6, 7, 8]), np.array([0, 1, 0, 1], bool), 99)]
    [[5, 99, 7, 98, 1], [99, 6, 98, 8, 1]]
    """
    inputs = noise_span_to_unique_sentinel(tokens, noise_mask, first_sentinel)
    targets = noise_span_to_unique_sentinel(tokens, ~noise_mask, first_sentinel)
    return np.append(inputs, eos), np.append(targets, eos)


def span_corrupt(tokens: np.ndarray, rng: np.random.Generator, first_sentinel: int, eos: int = 1,
                 noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """One raw segment -> (inputs, targets), each ending in EOS:
    inputs = nn1 S0 nn2 S1 ... + EOS, targets = S0 n1 S1 n2 ... + EOS."""
    mask = random_spans_noise_mask(len(tokens), rng, noise_density, mean_noise_span_length)
    return sentinel_pair(tokens, mask, first_sentinel, eos)

"""Property tests for seqio-exact span corruption."""

import numpy as np
import pytest

from t5kit.data.spans import (
    corrupted_lengths,
    fit_lengths,
    noise_and_spans,
    noise_span_to_unique_sentinel,
    random_spans_helper,
    random_spans_noise_mask,
    sentinel_pair,
    span_corrupt,
)


@pytest.mark.parametrize("inputs, raw, targets", [(512, 568, 114), (128, 141, 29), (256, 284, 58), (1024, 1137, 229)])
def test_length_table(inputs, raw, targets):
    assert random_spans_helper(inputs) == (raw, targets)
    assert corrupted_lengths(raw) == (inputs, targets)


def _rebuild(inputs, targets, first_sentinel):
    """Interleave targets back into inputs at the sentinels."""
    spans, cur, key = {}, None, None
    for t in targets[:-1]:
        if first_sentinel - 99 <= t <= first_sentinel:
            key, cur = t, []
            spans[key] = cur
        else:
            cur.append(t)
    out = []
    for t in inputs[:-1]:
        out.extend(spans[t] if t in spans else [t])
    return out


@pytest.mark.parametrize("length", [2, 3, 10, 141, 568, 1137])
def test_rebuilds_raw_tokens_and_counts_are_exact(length):
    for seed in range(20):
        rng = np.random.default_rng(seed)
        raw = rng.integers(3, 1000, size=length)
        inputs, targets = span_corrupt(raw, np.random.default_rng([seed, 1]), first_sentinel=32099)
        assert inputs[-1] == targets[-1] == 1
        assert _rebuild(inputs.tolist(), targets.tolist(), 32099) == raw.tolist()
        mask = random_spans_noise_mask(length, np.random.default_rng([seed, 1]))
        n_noise = min(max(int(round(length * 0.15)), 1), length - 1)
        n_spans = max(int(round(n_noise / 3.0)), 1)
        assert mask.sum() == n_noise
        starts = mask & ~np.concatenate([[False], mask[:-1]])
        assert starts.sum() == n_spans and not mask[0] and mask[-1]  # non-noise first, ends in noise
        if length in (141, 568, 1137):  # full raw segments give exactly the table's lengths
            assert (len(inputs), len(targets)) == {141: (128, 29), 568: (512, 114), 1137: (1024, 229)}[length]


def test_sentinels_count_down_and_byt5():
    tokens = np.arange(10, 20)
    mask = np.array([0, 1, 1, 0, 0, 1, 0, 0, 1, 1], bool)
    assert noise_span_to_unique_sentinel(tokens, mask, 32099).tolist() == [10, 32099, 13, 14, 32098, 16, 17, 32097]
    assert noise_span_to_unique_sentinel(tokens, ~mask, 258).tolist() == [258, 11, 12, 257, 15, 256, 18, 19]


UL2_SETTINGS = [(0.15, 3.0), (0.15, 8.0), (0.5, 3.0), (0.5, 8.0), (0.15, 64.0), (0.5, 64.0)]  # (r, mu) of R1 .. X4


@pytest.mark.parametrize("rate, mean_span", UL2_SETTINGS)
def test_fit_lengths_hold_every_shorter_segment(rate, mean_span):
    """Issue 20: for fit_lengths' raw length, a segment of any length up to it corrupts, as the noise
    mask draws it (`noise_and_spans` counts), into at most the fitted inputs / targets lengths with
    at most max_spans sentinels, and the full length fills them."""
    for inputs_length, targets_length in [(32, None), (128, 29), (512, None), (512, 114)]:
        raw, most_inputs, most_targets = fit_lengths(inputs_length, targets_length, rate, mean_span, max_spans=100)
        assert most_inputs <= inputs_length and (targets_length is None or most_targets <= targets_length)
        for n in range(2, raw + 1, 1 if raw < 200 else 7):
            mask = random_spans_noise_mask(n, np.random.default_rng(n), rate, mean_span)
            starts = mask & ~np.concatenate([[False], mask[:-1]])
            assert (mask.sum(), starts.sum()) == noise_and_spans(n, rate, mean_span) and starts.sum() <= 100
            inputs, targets = sentinel_pair(np.arange(5, 5 + n), mask, 32099)
            assert len(inputs) <= most_inputs and len(targets) <= most_targets
        mask = random_spans_noise_mask(raw, np.random.default_rng(0), rate, mean_span)
        assert [len(x) for x in sentinel_pair(np.arange(5, 5 + raw), mask, 32099)] == [most_inputs, most_targets]

"""Property tests for seqio-exact span corruption."""

import numpy as np
import pytest

from t5kit.data.spans import (
    corrupted_lengths,
    noise_span_to_unique_sentinel,
    random_spans_helper,
    random_spans_noise_mask,
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

"""An evaluation set split over data-parallel ranks (issue 17): every rank runs the same number of
forwards, each real batch runs on exactly one rank, and the padding batches count no token."""

import numpy as np
import pytest

from t5kit.data.tasks import rank_share


def _batches(n: int) -> list[dict]:
    """n batches whose labels name their index (rows of different lengths, as eval_batches gives)."""
    return [{"input_ids": np.full((2, 3 + k), 5), "labels": np.full((2, 1 + k), k)} for k in range(n)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8])
def test_every_rank_runs_the_same_number_of_forwards(n, world):
    shares = [list(rank_share(_batches(n), r, world)) for r in range(world)]
    assert {len(s) for s in shares} == {-(-n // world)}
    real = sorted(int(b["labels"][0, 0]) for s in shares for b in s if (b["labels"] != -100).any())
    assert real == list(range(n))  # each batch once
    padding = [b for s in shares for b in s if (b["labels"] == -100).all()]
    assert len(padding) == -(-n // world) * world - n
    assert all(b["input_ids"].shape == (2, 3) for b in padding)  # a copy of the first batch, labels masked

"""Issue 18: a pretraining process's peak memory does not grow with the corpus. The same one-step
run on Megatron datasets of 200k and 20M tokens (100x), each in a fresh process: the peak RSS is
measured in both, and the larger corpus may add at most 64 MiB."""

import subprocess
import sys

import numpy as np
from test_megatron_data import write_megatron
from test_pretrain import corpus  # noqa: F401  (corpus is a fixture)

SCRIPT = """
import resource, sys
from t5kit.cli import main
rc = main(sys.argv[1:])
print("peak_rss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rc)
"""


def _write_corpus(prefix, n_tokens: int, seed: int = 0) -> None:
    """Documents of 1..1000 tokens (ids 3..29, inside the test tokenizer's vocabulary)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 1000, n_tokens // 400)
    lengths = lengths[np.cumsum(lengths) <= n_tokens]
    tokens = rng.integers(3, 30, int(lengths.sum()), dtype=np.uint16)
    write_megatron(prefix, np.split(tokens, np.cumsum(lengths)[:-1]))


def _peak_rss_mib(corpus, tmp_path, prefix) -> float:  # noqa: F811
    args = ["pretrain", "--data-path", str(prefix), "--tokenizer", str(corpus / "tok"), "--model-preset", "tiny",
            "--seq-length", "32", "--micro-batch-size", "4", "--train-iters", "1", "--eval-interval", "1",
            "--eval-iters", "1", "--save-interval", "0", "--save", str(tmp_path / f"run-{prefix.name}")]
    res = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=300,
                         check=False)
    line = [x for x in res.stdout.splitlines() if x.startswith("peak_rss_kib")]
    assert res.returncode == 0 and line and line[0].endswith(" 0"), res.stderr[-2000:]
    return int(line[0].split()[1]) / 1024


def test_peak_rss_does_not_grow_with_the_corpus(corpus, tmp_path):  # noqa: F811
    small, large = tmp_path / "small", tmp_path / "large"
    _write_corpus(small, 200_000)
    _write_corpus(large, 20_000_000, seed=1)
    rss_small = _peak_rss_mib(corpus, tmp_path, small)
    rss_large = _peak_rss_mib(corpus, tmp_path, large)
    print(f"peak RSS: {rss_small:.1f} MiB (200k tokens), {rss_large:.1f} MiB (20M tokens)")
    assert rss_large - rss_small < 64, (rss_small, rss_large)

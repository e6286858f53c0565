"""torchrun with 2 CPU ranks (gloo) equals one process with gradient accumulation: same examples
per global batch (rank r takes every 2nd), loss normalised by the global target-token count."""

import json
import subprocess
import sys

import pytest

from test_pretrain import _losses, _pretrain_args, corpus  # noqa: F401  (fixture)


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_equal_one_process(corpus, tmp_path):  # noqa: F811
    common = ["--drop-remainders", "--save-interval", "3"]
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "t5kit", *_pretrain_args(corpus, one, 4, common)], check=True,
                   capture_output=True)
    two = tmp_path / "two"
    args = _pretrain_args(corpus, two, 4, common)
    args[args.index("--micro-batch-size") + 1] = "4"  # global 8 = 4 x 2 ranks, no accumulation
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "t5kit", *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    ckpt = json.loads(json.dumps(sorted(p.name for p in (two / "checkpoints").iterdir())))
    assert ckpt == ["step_00000003.pt"]
    import torch
    state = torch.load(two / "checkpoints" / ckpt[0], weights_only=False)
    assert len(state["data"]) == 2  # one iterator state per rank

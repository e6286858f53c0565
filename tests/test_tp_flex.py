"""Tensor parallelism with FlexAttention (issue 17). Without gradients FlexAttention looks the
relative bias up in its table inside score_mod; under TP that table is a DTensor split by head while
q / k / v hold this rank's heads. 2 CPU ranks (gloo) with FlexAttention forced give the logits of
the whole model (test_distributed's SDPA twin), and greedy generation (the decode cache holds this
rank's heads, the step gathers the logits split by vocabulary) gives its ids."""

import json
import os
import subprocess
import sys

import pytest

TP_FLEX = r'''
import json, sys, torch
import t5kit
import t5kit.model.t5 as t5
from t5kit.model.config import get_preset
from t5kit.training import parallel
out = sys.argv[1]
layout = parallel.init("cpu", 2)
cfg = get_preset("tiny").replace(vocab_size=256, dropout_rate=0.0)  # d_kv 16: FlexAttention's smallest
torch.manual_seed(0)
whole = t5kit.T5(cfg).eval()
whole.init_weights()
split = t5kit.T5(cfg).eval()
split.load_state_dict(whole.state_dict())
parallel.apply(split, layout)
ids = torch.randint(2, 256, (3, 11))
ids[1, 7:] = 0
dec = torch.randint(2, 256, (3, 6))
paths, attend = [], t5.attend
t5.attend = lambda q, k, v, bias, p: paths.append(type(bias).__name__) or attend(q, k, v, bias, p)
with torch.no_grad():
    want = whole(ids, dec, ids != 0)
    paths.clear()
    got = split(ids, dec, ids != 0).full_tensor()
result = {"max_diff": (got - want).abs().max().item(), "paths": paths[:],
          "same_ids": torch.equal(split.generate(ids, ids != 0, max_new_tokens=6),
                                  whole.generate(ids, ids != 0, max_new_tokens=6))}
if layout.rank == 0:
    json.dump(result, open(f"{out}/result.json", "w"))
parallel.shutdown()
'''


@pytest.mark.dist
def test_tensor_parallel_flex_logits_and_generation_equal_one_process(tmp_path):
    script = tmp_path / "tp_flex.py"
    script.write_text(TP_FLEX)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(tmp_path)], check=False, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "T5KIT_ATTENTION": "flex"})
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["paths"] == ["FlexBias"] * 6  # encoder: 2 blocks; decoder: 2 x (self, cross)
    assert result["max_diff"] < 1e-5
    assert result["same_ids"]

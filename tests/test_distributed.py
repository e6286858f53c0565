"""torchrun with 2 CPU ranks (gloo): every parallel layout equals one process with the same global
batch (rank r takes every 2nd example, the loss is normalised by the global target-token count);
checkpoints saved under one layout resume under another; bad layouts stop every rank with the
same message and no hang."""

import json
import subprocess
import sys

import pytest
import torch
from test_finetune import _ft_args, tasks  # noqa: F401  (fixture)
from test_finetune import _rows as _ft_rows
from test_pretrain import _losses, _pretrain_args, corpus  # noqa: F401  (fixture)

from t5kit.cli import main

LAYOUTS = {  # name -> (flags, micro batch): global batch 8 in every case
    "ddp": (["--parallel", "ddp"], 4),
    "fsdp": (["--parallel", "fsdp"], 2),  # 2 micro-batches per rank: reduce-scattered each
    "tp2": (["--tensor-model-parallel-size", "2"], 8),
    "fsdp_tp2": (["--parallel", "fsdp", "--tensor-model-parallel-size", "2", "--recompute-activations"], 8),
    "fsdp_compiled": (["--parallel", "fsdp", "--compile", "block"], 4),  # blocks compiled, then sharded
}
COMMON = ["--drop-remainders"]  # one example per row: every layout sees the same examples per step


def _torchrun(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "t5kit", *args], capture_output=True, text=True, timeout=timeout)


def _layout_args(corpus, out, iters, layout, extra=()):  # noqa: F811
    flags, micro = LAYOUTS[layout]
    args = _pretrain_args(corpus, out, iters, [*COMMON, *flags, *extra])
    args[args.index("--micro-batch-size") + 1] = str(micro)
    return args


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):  # noqa: F811
    """One process, micro batch 4 x 2 accumulation: 6 steps."""
    out = tmp_path_factory.mktemp("one")
    assert main(_pretrain_args(corpus, out, 6, COMMON)) == 0
    return _losses(out)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_losses_equal_one_process(layout, corpus, reference, tmp_path):  # noqa: F811
    out = tmp_path / layout
    res = _torchrun(_layout_args(corpus, out, 6, layout))
    assert res.returncode == 0, res.stderr[-3000:]
    got = _losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step, loss in got.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), (layout, step, loss, reference[step])
    assert (out / "final" / "model.safetensors").exists()  # exported from the sharded state


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fsdp", "tp2"])
def test_checkpoint_from_two_ranks_resumes_in_one_process(layout, corpus, reference, tmp_path):  # noqa: F811
    """Saved by 2 ranks (FSDP shards, or TP halves) at step 3, resumed by 1 process: the same
    losses as the uninterrupted single-process run; the per-rank data and RNG states were kept."""
    out = tmp_path / "job"
    res = _torchrun(_layout_args(corpus, out, 6, layout, ["--exit-interval", "3"]))
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    extra = torch.load(out / "checkpoints" / "step_00000003" / "extra.pt", weights_only=False)
    assert len(extra["rng"]) == 2 and len(extra["data"]) == (2 if layout == "fsdp" else 1)  # per data-parallel rank
    assert main(_pretrain_args(corpus, out, 6, [*COMMON, "--load", str(out)])) == 0
    got = _losses(out)
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(reference[step], rel=1e-5), (step, got[step], reference[step])


@pytest.mark.dist
def test_tensor_parallel_logits_equal_one_process(tmp_path):
    """An HF checkpoint split over 2 ranks by head and by vocabulary gives the logits of the whole
    model (gathered from the vocabulary shards), padded batch, v1.1 (untied) and v1.0 (tied)."""
    script = tmp_path / "tp_logits.py"
    script.write_text(TP_LOGITS)
    for tied in ("0", "1"):
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              str(script), str(tmp_path), tied], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads((tmp_path / "result.json").read_text())["max_diff"] < 1e-5


TP_LOGITS = r'''
import json, sys, torch
from t5kit.training import parallel
from t5kit.model.config import get_preset
from t5kit.model.t5 import T5
out, tied = sys.argv[1], sys.argv[2] == "1"
layout = parallel.init("cpu", 2)
cfg = get_preset("tiny").replace(vocab_size=256, dropout_rate=0.0)
if tied:
    cfg = cfg.replace(tie_word_embeddings=True, feed_forward_proj="relu", scale_decoder_outputs=True)
torch.manual_seed(0)
whole = T5(cfg)
whole.init_weights()
split = T5(cfg)
split.load_state_dict(whole.state_dict())
parallel.apply(split, layout)
ids = torch.randint(2, 256, (3, 11))
ids[1, 7:] = 0
dec = torch.randint(2, 256, (3, 6))
with torch.no_grad():
    want = whole(ids, dec, ids != 0)
    got = split(ids, dec, ids != 0).full_tensor()
if layout.rank == 0:
    json.dump({"max_diff": (got - want).abs().max().item()}, open(f"{out}/result.json", "w"))
parallel.shutdown()
'''


BAD = {  # extra flags -> the message every rank prints
    "batch": (["--global-batch-size", "6", "--micro-batch-size", "4"],
              "--global-batch-size 6 is not divisible by --micro-batch-size 4 x 2 data-parallel ranks"),
    "heads": (["--tensor-model-parallel-size", "2", "--num-attention-heads", "3"],
              "--tensor-model-parallel-size 2 does not divide --num-attention-heads (3)"),
    "tp_over_world": (["--tensor-model-parallel-size", "4"],
                      "--tensor-model-parallel-size 4: expected a divisor of the world size 2"),
}


@pytest.mark.dist
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_layout_stops_every_rank_with_its_reason(case, corpus, tmp_path):  # noqa: F811
    flags, message = BAD[case]
    res = _torchrun(_pretrain_args(corpus, tmp_path / case, 2, flags), timeout=120)
    assert res.returncode != 0
    assert res.stderr.count(message) == 2, res.stderr[-3000:]  # one line from each rank


@pytest.mark.dist
def test_checkpoint_of_another_shape_stops_every_rank(corpus, tmp_path):  # noqa: F811
    out = tmp_path / "small"
    assert main(_pretrain_args(corpus, out, 2)) == 0
    res = _torchrun(_pretrain_args(corpus, tmp_path / "big", 2, ["--load", str(out), "--hidden-size", "128",
                                                                 "--global-batch-size", "8"]), timeout=120)
    assert res.returncode != 0
    assert res.stderr.count("checkpoint is for a different model shape (d_model: checkpoint 64 vs run 128") == 2, \
        res.stderr[-3000:]



@pytest.mark.dist
@pytest.mark.slow
def test_finetune_under_fsdp_equals_one_process_with_generation_metric(tasks, tmp_path):  # noqa: F811
    """Fine-tuning on 2 FSDP ranks, validated by greedy generation (every unit gathered while it
    generates): the losses and exact-match scores of one process accumulating 2 micro-batches."""
    extra = ["--valid", f"{tasks / 'copy_valid.jsonl'}:copy: ", "--eval-metric", "exact_match", "--eval-interval",
             "3", "--global-batch-size", "16", "--micro-batch-size", "8", "--pack"]  # packed: the same batches at any rank count
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_ft_args(tasks, one, 6, *extra)) == 0
    res = _torchrun([*_ft_args(tasks, two, 6, *extra), "--parallel", "fsdp"])
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _ft_rows(one), _ft_rows(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        if "eval_exact_match" in x:
            assert y["eval_exact_match"] == x["eval_exact_match"] and y["eval_loss"] == pytest.approx(x["eval_loss"])
    assert sum("eval_exact_match" in r for r in b) == 2
    assert (two / "best" / "model.safetensors").exists()


def test_model_built_on_meta_device_initialises_as_init_weights():
    """parallel.apply materialises a meta-device model one full tensor at a time, drawing exactly
    what T5.init_weights draws from the same seed (what keeps pretraining from scratch exact)."""
    from t5kit.model.config import get_preset
    from t5kit.model.t5 import T5
    from t5kit.training import parallel
    cfg = get_preset("tiny").replace(vocab_size=256)
    whole = T5(cfg)
    torch.manual_seed(5)
    whole.init_weights()
    with torch.device("meta"):
        lazy = T5(cfg)
    torch.manual_seed(5)
    parallel.apply(lazy, parallel.Layout(), recompute=True)
    got = lazy.state_dict()
    assert all(torch.equal(got[k], v) for k, v in whole.state_dict().items()) and got.keys() == whole.state_dict().keys()

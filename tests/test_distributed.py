"""torchrun with 2 CPU ranks (gloo): every parallel layout equals one process with the same global
batch (rank r takes every 2nd example, the loss is normalised by the global target-token count);
checkpoints saved under one layout resume under another; bad layouts stop every rank with the
same message and no hang."""

import contextlib
import json
import subprocess
import sys
from typing import ClassVar

import psutil
import pytest
import torch
from test_finetune import _ft_args, tasks  # noqa: F401  (fixture)
from test_finetune import _rows as _ft_rows
from test_pretrain import _evals, _losses, _pretrain_args, corpus  # noqa: F401  (fixture)

import t5kit.jobs.pretrain as pretrain_job
from t5kit.cli import main
from t5kit.data.pretraining import SpanCorruptionBatches

LAYOUTS = {  # name -> (flags, micro batch): global batch 8 in every case
    "ddp": (["--parallel", "ddp"], 4),
    "fsdp": (["--parallel", "fsdp"], 2),  # 2 micro-batches per rank: reduce-scattered each
    "tp2": (["--tensor-model-parallel-size", "2"], 8),
    "fsdp_tp2": (["--parallel", "fsdp", "--tensor-model-parallel-size", "2", "--recompute-activations"], 8),
    "fsdp_compiled": (["--parallel", "fsdp", "--compile", "block"], 4),  # blocks compiled, then sharded
}
COMMON = ["--drop-remainders"]  # one example per row: every layout sees the same examples per step


def _torchrun(args, timeout=300, nproc=2):
    """`t5kit args` on `nproc` CPU ranks. A run still going after `timeout` seconds (a rank waiting in
    a collective the others never join) fails the test, its workers killed with it: torchrun starts
    each worker in a session of its own, so they are found as its children."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             str(nproc), "-m", "t5kit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        _, err = proc.communicate()
        pytest.fail(f"torchrun of {nproc} ranks still running after {timeout} s (a hang?); stderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


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
@pytest.mark.slow
def test_held_out_loss_on_two_fsdp_ranks_resumes_in_one_process(corpus, tmp_path):  # noqa: F811
    """Issue 17: pretraining's held-out set, 3 batches of 2 rows, on 2 FSDP ranks: rank 1 runs a batch
    that counts nothing beside rank 0's second, and eval_loss is one process's. Saved at step 3 and
    resumed by one process with micro-batch 4 (whose own held-out batches would have 4 rows), the
    evaluation at step 6 runs on the checkpoint's batches: one process's again."""
    evals = ["--eval-iters", "3", "--eval-interval", "3"]
    one, job = tmp_path / "one", tmp_path / "job"
    args = _pretrain_args(corpus, one, 6, [*COMMON, *evals])
    args[args.index("--micro-batch-size") + 1] = "2"  # the FSDP layout's micro batch, accumulated 4 times
    assert main(args) == 0
    res = _torchrun(_layout_args(corpus, job, 6, "fsdp", [*evals, "--exit-interval", "3"]))
    assert res.returncode == 0, res.stderr[-3000:]
    assert main(_pretrain_args(corpus, job, 6, [*COMMON, *evals, "--load", str(job)])) == 0
    want, got = _evals(one), _evals(job)
    assert sorted(got) == sorted(want) == [3, 6]
    for step in (3, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])


class _RanksInTurn:
    """One process reading a 2-rank run's training batches: rank 0's, then rank 1's, as the two
    accumulated micro-batches of each step. Packed batches are not equal across rank counts by
    construction: rank r packs its own every-2nd example first-fit, so the examples of a 2-rank step
    are those of a one-process step only when the two ranks' counts happen to add up to its prefix.
    This is the one-process run exactly comparable to 2 ranks: the same micro-batches, whose
    target-token counts differ, the loss normalised by the same global count. `read` records each
    batch's (target tokens, most segments in a row)."""
    read: ClassVar[list] = []

    def __init__(self, *args, rank, world, **kw):
        assert (rank, world) == (0, 1)
        self.ranks = [SpanCorruptionBatches(*args, rank=r, world=2, **kw) for r in (0, 1)]
        self.turn = 0

    def __getattr__(self, name):  # raw_len, targets_length, segments, pack: the job reports them
        return getattr(self.ranks[0], name)

    def __next__(self):
        self.turn = 1 - self.turn
        batch = next(self.ranks[1 - self.turn])
        self.read.append((int((batch["labels"] != -100).sum()), int(batch["segment_ids"].max())))
        return batch


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """3000 documents of 1-2 words: seqio's groups of 128 documents leave a short tail every ~5
    segments of 64-token inputs, so packed rows and unequal token counts per rank come early."""
    import numpy as np

    from t5kit.data.tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("short")
    rng = np.random.default_rng(0)
    words = ["in", "the", "beginning", "god", "created", "heaven", "and", "earth", "light", "darkness", "waters",
             "day", "night", "evening"]
    (d / "c.txt").write_text("\n".join(" ".join(rng.choice(words, rng.integers(1, 3))) for _ in range(3000)) + "\n")
    train_tokenizer([str(d / "c.txt")], 30, str(d / "tok"))
    return d


PACKED = ["--seq-length", "64", "--eval-iters", "3", "--eval-interval", "3"]  # packed; micro batch 4, global 8


@pytest.fixture(scope="module")
def packed_reference(short_docs, tmp_path_factory):
    """One process, 6 steps, reading the 2-rank run's packed batches in turn (accumulation 2)."""
    out = tmp_path_factory.mktemp("packed_one")
    _RanksInTurn.read.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain_job, "SpanCorruptionBatches", _RanksInTurn)  # the training stream only
        assert main(_pretrain_args(short_docs, out, 6, [*PACKED, "--save-interval", "0"])) == 0
    read = _RanksInTurn.read
    assert len(read) == 12 and max(n for _, n in read) > 1  # some row holds several examples
    assert any(read[i][0] != read[i + 1][0] for i in range(0, 12, 2))  # and the ranks' token counts differ
    return out


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("how", ["ddp", "fsdp"])
def test_packed_pretraining_on_two_ranks_equals_one_process(how, short_docs, packed_reference, tmp_path):
    """Issue 17: default (packed) pretraining on 2 ranks, whose batches hold unequal numbers of target
    tokens: the losses of one process reading the same batches (`_RanksInTurn`), and the held-out
    loss (the same batches at any rank count) of that process."""
    out = tmp_path / how
    res = _torchrun(_pretrain_args(short_docs, out, 6, [*PACKED, "--parallel", how]))
    assert res.returncode == 0, res.stderr[-3000:]
    want, got = _losses(packed_reference), _losses(out)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=1e-5), (how, step, loss, want[step])
    want, got = _evals(packed_reference), _evals(out)
    assert sorted(got) == [3, 6] and all(got[s] == pytest.approx(want[s], rel=1e-5) for s in got), (got, want)


FT_LAYOUTS = {  # name -> (processes, flags): 2 data-parallel ranks in each
    "fsdp": (2, ["--parallel", "fsdp"]),
    "fsdp_tp2": (4, ["--parallel", "fsdp", "--tensor-model-parallel-size", "2"]),
}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(FT_LAYOUTS))
def test_finetune_validation_of_an_odd_batch_count_equals_one_process(layout, tasks, tmp_path):  # noqa: F811
    """Issue 17: 40 validation examples in batches of 16 are 3 batches for 2 data-parallel ranks.
    Every FSDP forward all-gathers across them, so rank 1 runs a batch that counts nothing beside
    rank 0's second (split as before, rank 1 left rank 0 waiting forever: the timeout fails the
    test). Under FSDP x TP (4 ranks, 2 x 2) the padding batch goes through the vocabulary-parallel
    loss. The validation loss and token accuracy are one process's."""
    nproc, flags = FT_LAYOUTS[layout]
    extra = ["--valid", f"{tasks / 'copy_valid.jsonl'}:copy: ", "--eval-batch-size", "16", "--eval-interval", "1",
             "--global-batch-size", "16", "--micro-batch-size", "8", "--pack", "--save-interval", "0"]
    one, many = tmp_path / "one", tmp_path / layout
    assert main(_ft_args(tasks, one, 2, *extra)) == 0
    res = _torchrun([*_ft_args(tasks, many, 2, *extra), *flags], timeout=240, nproc=nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _ft_rows(one), _ft_rows(many)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["eval_loss"] == pytest.approx(x["eval_loss"], rel=1e-5), (y["eval_loss"], x["eval_loss"])
        assert y["eval_accuracy"] == pytest.approx(x["eval_accuracy"], rel=1e-5)


@pytest.mark.dist
def test_tensor_parallel_logits_equal_one_process(tmp_path):
    """An HF checkpoint split over 2 ranks by head and by vocabulary gives the logits of the whole
    model (gathered from the vocabulary shards), padded batch, v1.1 (untied) and v1.0 (tied). The
    vocabulary-parallel loss of a batch whose labels are all -100 (an evaluation's padding batch,
    tasks.rank_share) is 0 over 0 tokens, label smoothing and z-loss included, as in one process."""
    script = tmp_path / "tp_logits.py"
    script.write_text(TP_LOGITS)
    for tied in ("0", "1"):
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              str(script), str(tmp_path), tied], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        result = json.loads((tmp_path / "result.json").read_text())
        assert result["max_diff"] < 1e-5
        assert result["padding_terms"] == result["padding_terms_one_process"] == [0.0, 0, 0]


TP_LOGITS = r'''
import json, sys, torch
from t5kit.training import parallel
from t5kit.training.loss import loss_terms
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
padding = {"input_ids": ids, "decoder_input_ids": dec, "labels": torch.full_like(dec, -100)}
with torch.no_grad(), parallel.vocab_parallel():  # every rank: the loss all-reduces over the vocabulary shards
    terms = [t.item() for t in loss_terms(split, padding, z_loss=1e-4, label_smoothing=0.1)]
    alone = [t.item() for t in loss_terms(whole, padding, z_loss=1e-4, label_smoothing=0.1)]
if layout.rank == 0:
    json.dump({"max_diff": (got - want).abs().max().item(), "padding_terms": terms,
               "padding_terms_one_process": alone}, open(f"{out}/result.json", "w"))
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

"""Pretraining: data pipeline, exact resume after kill -9, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from t5kit.cli import main
from t5kit.data.pretraining import DataConfig, SpanCorruptionBatches
from t5kit.data.spans import random_spans_helper
from t5kit.data.store import TokenStore, build_token_store
from t5kit.data.tokenizer import Tokenizer, train_tokenizer
from t5kit.training.loop import TrainConfig

WORDS = "in the beginning god created heaven and earth light darkness waters day night evening morning".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    (d / "c.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 40)) for _ in range(300)) + "\n")
    train_tokenizer([str(d / "c.txt")], 30, str(d / "tok"))
    return d


def test_batches_deterministic_resumable_and_sharded(corpus, tmp_path):
    tok = Tokenizer.from_pretrained(corpus / "tok")
    build_token_store([str(corpus / "c.txt")], tok, str(tmp_path / "store"), progress=False)
    store = TokenStore(str(tmp_path / "store"), tok)
    raw_len = random_spans_helper(32)[0]
    segments = store.segments(raw_len)
    make = lambda rank=0, world=1, pack=True: SpanCorruptionBatches(  # noqa: E731
        segments, DataConfig(inputs_length=32), tok.sentinel_id(0), 4, rank=rank, world=world, pack=pack)
    a = make()
    first = [next(a) for _ in range(3)]
    b = make()
    b.load_state({"epoch": 0, "position": 4})
    resumed = next(b)
    assert all(np.array_equal(first[1][k], resumed[k]) for k in first[1])
    assert first[0]["input_ids"].shape == (4, 32) and first[0]["labels"].shape == (4, make().targets_length)
    r0, r1 = make(0, 2), make(1, 2)
    assert not set(r0._order(0)) & set(r1._order(0))  # ranks never overlap
    assert len(set(r0._order(0)) | set(r1._order(0))) == len(segments)
    dropped = make(pack=False)
    assert (dropped.segments[:, 1] == raw_len).all() and len(dropped.segments) < len(segments)
    assert "segment_ids" not in next(dropped)


def test_packed_rows_hold_whole_examples_with_their_own_segments(corpus, tmp_path):
    tok = Tokenizer.from_pretrained(corpus / "tok")
    build_token_store([str(corpus / "c.txt")], tok, str(tmp_path / "store"), progress=False)
    store = TokenStore(str(tmp_path / "store"), tok)
    segments = store.segments(random_spans_helper(64)[0], group_docs=2)  # many short group tails to pack
    it = SpanCorruptionBatches(segments, DataConfig(inputs_length=64), tok.sentinel_id(0), 8)
    packed_rows = 0
    for _ in range(20):
        b = next(it)
        for r in range(8):
            seg, dseg = b["segment_ids"][r], b["decoder_segment_ids"][r]
            n = seg.max()
            packed_rows += n > 1
            for k in range(1, n + 1):
                ins, tgt = b["input_ids"][r][seg == k], b["labels"][r][dseg == k]
                assert ins[-1] == 1 and tgt[-1] == 1 and tgt[0] == tok.sentinel_id(0)  # whole examples
                assert b["decoder_input_ids"][r][dseg == k][0] == 0  # each segment starts its own decoder
            assert (b["labels"][r][dseg == 0] == -100).all() and (b["input_ids"][r][seg == 0] == 0).all()
    assert packed_rows > 0


def test_store_rejects_other_tokenizer(corpus, tmp_path):
    tok = Tokenizer.from_pretrained(corpus / "tok")
    build_token_store([str(corpus / "c.txt")], tok, str(tmp_path / "s"), progress=False)
    with pytest.raises(ValueError, match="built with tokenizer sentencepiece:.*rebuild it"):
        TokenStore(str(tmp_path / "s"), Tokenizer.byt5())


def test_empty_corpus_and_bad_utf8(corpus, tmp_path):
    tok = Tokenizer.from_pretrained(corpus / "tok")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty corpus: no text in .*empty.txt"):
        build_token_store([str(tmp_path / "empty.txt")], tok, str(tmp_path / "s1"), progress=False)
    (tmp_path / "bad.txt").write_bytes(b"good line\nbad \xff line\nmore\n")
    with pytest.raises(ValueError, match=r"bad.txt: line 2 is not UTF-8 \(byte offset 14\)"):
        build_token_store([str(tmp_path / "bad.txt")], tok, str(tmp_path / "s2"), progress=False)
    header = build_token_store([str(tmp_path / "bad.txt")], tok, str(tmp_path / "s3"), skip_bad_lines=True, progress=False)
    assert header["skipped_lines"] == 1 and header["n_docs"] == 2


def test_global_batch_must_divide():
    with pytest.raises(ValueError, match="--global-batch-size 10 is not divisible by --micro-batch-size 4 x 1 data-parallel ranks"):
        TrainConfig(micro_batch=4, global_batch=10)


def _pretrain_args(corpus, out, iters, extra=()):
    return ["pretrain", "--data-path", str(corpus / "c.txt"), "--tokenizer", str(corpus / "tok"), "--model-preset",
            "tiny", "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters",
            str(iters), "--lr-warmup-iters", "2", "--eval-interval", "0", "--save-interval", "2", "--log-interval",
            "1", "--save", str(out), "--seed", "7", *extra]


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))}


def kill9_after_checkpoint(argv: list[str], run, step: int, iters: int) -> int:
    """Run `t5kit argv` in a child, SIGKILL it once checkpoint `step` is written and check that the
    kill landed mid-run: the child died of the signal, exported no final/, and its latest checkpoint
    is below `iters`. -> that checkpoint's step."""
    from t5kit.training.checkpoint import latest
    proc = subprocess.Popen([sys.executable, "-m", "t5kit", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (run / "checkpoints" / f"step_{step:08d}").is_dir():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the child ended before the kill: nothing was interrupted"
    assert not (run / "final").exists()
    saved = int(os.path.basename(latest(str(run))).split("_")[1])
    assert step <= saved < iters
    return saved


@pytest.mark.slow
def test_kill9_then_resume_matches_uninterrupted(corpus, tmp_path):
    full = tmp_path / "full"
    assert main(_pretrain_args(corpus, full, 8)) == 0
    ref = _losses(full)
    run = tmp_path / "killed"
    kill9_after_checkpoint(_pretrain_args(corpus, run, 8), run, 2, 8)
    assert main(_pretrain_args(corpus, run, 8, ["--resume"])) == 0
    got = _losses(run)  # the log is appended: the resumed run's rows come last and win
    for step in range(3, 9):
        assert abs(got[step] - ref[step]) <= 1e-6, (step, got[step], ref[step])
    assert (run / "final" / "model.safetensors").exists() and (run / "final" / "spiece.model").exists()


def _evals(out):
    """step -> eval_loss, the last row of each step winning (a resumed run appends to the log)."""
    return {r["step"]: r["eval_loss"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))
            if "eval_loss" in r}


def test_held_out_loss_is_on_fixed_batches(corpus, tmp_path):
    """Issue 17: every evaluation reads the same --eval-iters held-out batches, so an unchanged
    model (--lr 0) reports the same eval_loss each time."""
    out = tmp_path / "still"
    assert main(_pretrain_args(corpus, out, 3, ["--lr", "0", "--eval-interval", "1", "--eval-iters", "3"])) == 0
    losses = _evals(out)
    assert sorted(losses) == [1, 2, 3] and len(set(losses.values())) == 1, losses


def test_no_held_out_batch_is_an_error(corpus, tmp_path, capsys):
    assert main(_pretrain_args(corpus, tmp_path / "x", 2, ["--eval-interval", "1", "--eval-iters", "0"])) == 2
    assert "--eval-iters 0: expected at least 1 held-out batch" in capsys.readouterr().err


def test_held_out_batches_resume_from_the_checkpoint(corpus, tmp_path):
    """A run stopped at step 3 (--exit-interval) and resumed with another micro-batch size (whose
    own held-out batches would have 2 rows, not 4) evaluates at steps 4 and 6 on the batches the run
    began with, kept in the checkpoint: the eval_loss of the uninterrupted run."""
    import torch
    flags = ["--eval-interval", "2", "--eval-iters", "3", "--drop-remainders"]  # the same examples per step
    full, run = tmp_path / "full", tmp_path / "run"
    assert main(_pretrain_args(corpus, full, 6, flags)) == 0
    assert main(_pretrain_args(corpus, run, 6, [*flags, "--exit-interval", "3"])) == 0
    held_out = torch.load(run / "checkpoints" / "step_00000003" / "extra.pt", weights_only=False)["evaluation"]
    assert [b["input_ids"].shape for b in held_out] == [(4, 32)] * 3
    assert main(_pretrain_args(corpus, run, 6, [*flags, "--resume", "--micro-batch-size", "2"])) == 0
    want, got = _evals(full), _evals(run)
    assert sorted(got) == sorted(want) == [2, 4, 6]
    for step in (4, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])


def test_resume_with_other_shape_is_an_error(corpus, tmp_path, capsys):
    out = tmp_path / "a"
    assert main(_pretrain_args(corpus, out, 2)) == 0
    rc = main(_pretrain_args(corpus, tmp_path / "b", 4, ["--hidden-size", "32", "--load", str(out / "checkpoints")]))
    assert rc == 2 and "different model shape (d_model: checkpoint 64 vs run 32)" in capsys.readouterr().err


def test_megatron_example_flags_parse(corpus, tmp_path, capsys):
    """The issue's example command, shrunk only in iterations: the shape flags take effect."""
    rc = main(["pretrain", "--encoder-num-layers", "2", "--decoder-num-layers", "2", "--hidden-size", "64",
               "--num-attention-heads", "4", "--kv-channels", "16", "--seq-length", "32", "--max-position-embeddings",
               "32", "--data-path", str(corpus / "c.txt"), "--tokenizer", str(corpus / "tok"), "--train-iters", "1",
               "--micro-batch-size", "2", "--save", str(tmp_path / "m"), "--eval-interval", "0"])
    assert rc == 0
    cfg = json.load(open(tmp_path / "m" / "final" / "config.json"))
    assert (cfg["num_layers"], cfg["d_model"], cfg["num_heads"], cfg["d_kv"]) == (2, 64, 4, 16)
    assert json.load(open(tmp_path / "m" / "run_config.json"))["flags"]["hidden_size"] == 64
    assert main(["pretrain", "--seq-length", "64", "--max-position-embeddings", "32", "--data-path",
                 str(corpus / "c.txt"), "--save", str(tmp_path / "x")]) == 2
    assert "--max-position-embeddings 32 < --seq-length 64" in capsys.readouterr().err


def test_checkpoint_write_failure_keeps_previous(corpus, tmp_path, monkeypatch):
    """A full disk mid-save: the previous checkpoint survives and no temp file is left."""
    import torch

    from t5kit.training import checkpoint
    out = tmp_path / "r"
    assert main(_pretrain_args(corpus, out, 2)) == 0
    before = sorted(os.listdir(out / "checkpoints"))

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    model = __import__("t5kit").T5.from_pretrained(out / "final")
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(str(out / "checkpoints"), 99, model, torch.optim.SGD(model.parameters(), lr=0.1), [{}])
    assert sorted(os.listdir(out / "checkpoints")) == before


def test_bf16_training_runs_and_learns(corpus, tmp_path):
    out = tmp_path / "bf16"
    assert main(_pretrain_args(corpus, out, 12, ["--bf16", "--lr", "3e-3"])) == 0
    losses = _losses(out)
    assert losses[12] < losses[1]


@pytest.mark.slow
def test_corpus_check_on_arbitrary_bytes_names_the_problem_or_counts(tmp_path_factory):
    """Property (hypothesis): any bytes as a corpus give a document count or a clear ValueError."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    from t5kit.data.corpus import check_corpus
    folder = tmp_path_factory.mktemp("bytes")

    @hypothesis.settings(max_examples=60, deadline=None)
    @hypothesis.given(st.binary(max_size=300), st.sampled_from([".txt", ".jsonl"]))
    def check(blob, ext):
        path = folder / f"c{ext}"
        path.write_bytes(blob)
        try:
            n = check_corpus([str(path)])
        except ValueError as e:
            assert str(path) in str(e) and ("line" in str(e) or "empty corpus" in str(e)), e
        else:
            assert n >= 1
    check()

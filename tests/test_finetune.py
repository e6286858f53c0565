"""Fine-tuning and evaluation: a two-task mixture learnt to >= 90% exact match, exact resume after
kill -9, frozen parts bit for bit, <save>/best, the jobs' commands, and bad input."""

import csv
import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file
from test_pretrain import kill9_after_checkpoint

import t5kit
from t5kit.cli import main
from t5kit.jobs.finetune import FinetuneConfig
from t5kit.options import resolve, to_flags

WORDS = ["cat", "dog", "bird", "fish", "horse", "mouse", "tiger", "lion", "zebra", "snake", "whale", "eagle"]


def _examples(seed: int, n: int):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 3))]
        rows.append((" ".join(words), " ".join(words), " ".join(reversed(words))))
    return rows


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """copy (JSONL, custom fields, prefix in the spec) and reverse (CSV) tasks, a tokenizer, a tiny model."""
    d = tmp_path_factory.mktemp("ft")
    for split, seed, n in (("train", 0, 2000), ("valid", 1, 40), ("test", 2, 60)):
        with open(d / f"copy_{split}.jsonl", "w") as f:
            for src, same, _ in _examples(seed, n):
                f.write(json.dumps({"src": src, "tgt": same}) + "\n")
        with open(d / f"rev_{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["src", "tgt"])
            w.writerows((src, rev) for src, _, rev in _examples(seed + 10, n))
    (d / "words.txt").write_text("\n".join(f"copy reverse {' '.join(random.Random(i).sample(WORDS, 6))}"
                                           for i in range(200)) + "\n")
    tok = t5kit.train_tokenizer([str(d / "words.txt")], 40, str(d / "model"), extra_ids=4)
    cfg = t5kit.get_preset("tiny").replace(vocab_size=128, dropout_rate=0.0)
    model = t5kit.T5(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model.save_pretrained(d / "model")
    assert tok.vocab_size <= 128
    return d


def _ft_args(d, save, iters, *extra):
    return ["finetune", "--model", str(d / "model"), "--train", f"{d / 'copy_train.jsonl'}:copy: ",
            f"{d / 'rev_train.csv'}:reverse: ", "--input-field", "src", "--target-field", "tgt",
            "--max-input-length", "16", "--max-target-length", "8", "--micro-batch-size", "16",
            "--train-iters", str(iters), "--lr", "3e-3", "--lr-warmup-iters", "10", "--log-interval", "1",
            "--save", str(save), "--seed", "3", *extra]


def _rows(save):
    return [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]


@pytest.mark.slow
def test_mixture_reaches_90_percent_exact_match(tasks, tmp_path, capsys):
    save = tmp_path / "run"
    # packed rows mix both tasks in every batch (length buckets would sort them into batches of one task)
    assert main(_ft_args(tasks, save, 500, "--valid", f"{tasks / 'rev_valid.csv'}:reverse: ",
                         "--eval-metric", "exact_match", "--eval-interval", "100", "--save-interval", "0",
                         "--mixture", "temperature", "--mixture-temperature", "2", "--pack",
                         "--max-input-length", "32", "--max-target-length", "16")) == 0
    err = capsys.readouterr().err
    assert "mixture rates: copy_train 0.500, rev_train 0.500" in err
    for name, prefix in (("copy_test.jsonl", "copy: "), ("rev_test.csv", "reverse: ")):
        out = tmp_path / f"{name}.json"
        preds = tmp_path / f"{name}.pred.jsonl"
        assert main(["evaluate", "--model", str(save / "best"), "--data", str(tasks / name), "--prefix", prefix,
                     "--input-field", "src", "--target-field", "tgt", "--metric", "exact_match", "accuracy",
                     "--max-new-tokens", "8", "--output", str(out), "--predictions", str(preds)]) == 0
        scores = json.load(open(out))
        assert set(scores) == {"exact_match", "accuracy", "n_examples", "truncated_inputs"}
        assert scores["n_examples"] == 60 and scores["truncated_inputs"] == 0
        assert scores["exact_match"] >= 90, scores
        rows = [json.loads(line) for line in open(preds)]
        assert [r["input"] for r in rows][:2] == [prefix + src for src, *_ in _examples(2 if "copy" in name else 12, 2)]
        assert set(rows[0]) == {"input", "target", "prediction"}


@pytest.mark.slow
def test_kill9_then_resume_matches_uninterrupted(tasks, tmp_path):
    extra = ("--save-interval", "2", "--dropout", "0.1", "--label-smoothing", "0.1")
    full = tmp_path / "full"
    assert main(_ft_args(tasks, full, 8, *extra)) == 0
    ref = {r["step"]: r["loss"] for r in _rows(full)}
    run = tmp_path / "killed"
    kill9_after_checkpoint(_ft_args(tasks, run, 8, *extra), run, 2, 8)
    assert main(_ft_args(tasks, run, 8, *extra, "--resume")) == 0
    last = {r["step"]: r["loss"] for r in _rows(run)}  # the resumed rows come last
    for step in range(3, 9):
        assert abs(last[step] - ref[step]) <= 1e-6, (step, last[step], ref[step])


def _too_long(tasks, name: str, prefix: str, limit: int) -> int:
    """How many of a task file's inputs have more than `limit` tokens."""
    from t5kit.data.readers import TaskSource, read_examples
    tok = t5kit.Tokenizer.from_pretrained(tasks / "model")
    examples = read_examples(TaskSource(str(tasks / name), prefix, "src", "tgt"))
    return sum(len(tok.encode(i)) > limit for i, _ in examples)


def test_evaluate_reports_truncated_inputs_once(tasks, tmp_path, capsys):
    """Issue 17: inputs cut to --max-input-length are counted, said once and kept in the result JSON."""
    out = tmp_path / "scores.json"
    assert main(["evaluate", "--model", str(tasks / "model"), "--data", str(tasks / "copy_test.jsonl"), "--prefix",
                 "copy: ", "--input-field", "src", "--target-field", "tgt", "--metric", "exact_match",
                 "--max-new-tokens", "2", "--max-input-length", "10", "--output", str(out)]) == 0
    n = _too_long(tasks, "copy_test.jsonl", "copy: ", 10)
    assert 0 < n < 60 and json.loads(out.read_text())["truncated_inputs"] == n
    err = capsys.readouterr().err
    assert err.count("truncated") == 1 and f"truncated {n} inputs to --max-input-length 10" in err, err


def test_validation_by_generation_reports_truncated_inputs_once_per_evaluation(tasks, tmp_path, capsys):
    """Issue 17: fine-tuning's validation by generation says how many inputs it cut, once per evaluation."""
    assert main(_ft_args(tasks, tmp_path / "run", 2, "--valid", f"{tasks / 'copy_valid.jsonl'}:copy: ",
                         "--eval-metric", "exact_match", "--eval-interval", "1", "--max-input-length", "10",
                         "--save-interval", "0")) == 0
    n = _too_long(tasks, "copy_valid.jsonl", "copy: ", 10)
    err = capsys.readouterr().err
    assert 0 < n < 40 and f"valid copy_valid: 40 examples; truncated {n} inputs" in err  # the task report
    assert err.count("validation by generation: truncated") == 2, err
    assert err.count(f"validation by generation: truncated {n} inputs to --max-input-length 10\n") == 2, err


def test_frozen_parts_stay_bit_identical(tasks, tmp_path):
    save = tmp_path / "frozen"
    assert main(_ft_args(tasks, save, 5, "--freeze", "encoder", "--freeze", "embeddings", "--weight-decay", "0.1",
                         "--save-interval", "0")) == 0
    before, after = load_file(tasks / "model" / "model.safetensors"), load_file(save / "final" / "model.safetensors")
    frozen = [k for k in before if k.startswith(("encoder.", "shared."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["decoder.block.0.layer.0.SelfAttention.q.weight"],
                           after["decoder.block.0.layer.0.SelfAttention.q.weight"])


def test_best_holds_the_best_validation_step(tasks, tmp_path):
    save = tmp_path / "best"
    assert main(_ft_args(tasks, save, 60, "--valid", f"{tasks / 'copy_valid.jsonl'}:copy: ", "--eval-metric",
                         "exact_match", "--eval-interval", "10", "--save-interval", "0", "--lr", "1e-2")) == 0
    evals = [(r["step"], r["eval_exact_match"]) for r in _rows(save) if "eval_exact_match" in r]
    assert len(evals) == 6 and len({v for _, v in evals}) > 1
    best_step, best = max(evals, key=lambda e: (e[1], -e[0]))  # the first step reaching the maximum
    state = json.load(open(save / "best" / "trainer_state.json"))
    assert state == {"step": best_step, "monitor": "eval_exact_match", "value": best}
    again = t5kit.evaluate(t5kit.EvalConfig(model=str(save / "best"), data=str(tasks / "copy_valid.jsonl"),
                                            prefix="copy: ", input_field="src", target_field="tgt",
                                            metric=["exact_match"], max_new_tokens=8, max_input_length=16),
                           progress=False)
    assert again["exact_match"] == best
    assert json.load(open(save / "final" / "trainer_state.json")) == {"step": 60}


@pytest.mark.hf
def test_exports_load_in_transformers_and_generate(tasks, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    save = tmp_path / "exp"
    assert main(_ft_args(tasks, save, 3, "--save-interval", "0")) == 0
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(save / "final")
    ids = torch.tensor([[5, 6, 1]])
    dec = torch.tensor([[0, 5]])
    ours = t5kit.T5.from_pretrained(save / "final")
    assert torch.allclose(hf(input_ids=ids, decoder_input_ids=dec).logits, ours(ids, dec), atol=1e-4)
    assert main(["generate", "--model", str(save / "final"), "copy: cat dog"]) == 0


def test_flags_reproduce_the_config():
    cfg = FinetuneConfig(model="m", train=["a.jsonl:translate English to French: ", "b.csv"], prefix="x: ",
                         freeze=["encoder"], pack=True, mixture_cap=100, lr=1e-3)
    args = main.__globals__["build_parser"]().parse_args(["finetune", *to_flags(cfg)])
    values = {k: v for k, v in vars(args).items() if k in cfg.__dataclass_fields__ and v is not None}
    assert resolve(FinetuneConfig, None, values) == cfg


@pytest.mark.parametrize("write, args, message", [
    (lambda d: (d / "t.jsonl").write_text('{"input": "a", "target": "b"}\n{"input": "a"\n'), [],
     r"t.jsonl: line 2 is not a JSON object"),
    (lambda d: (d / "t.jsonl").write_text('{"input": "a", "target": "b"}\n{"input": "a"}\n'), [],
     r"t.jsonl: line 2 has no 'target' field"),
    (lambda d: (d / "t.csv").write_text("question,answer\nq,a\n"), [], r"t.csv: no column 'input'"),
    (lambda d: (d / "t.jsonl").write_text('{"input": "a", "target": "b"}\n'), ["--valid", "EMPTY"],
     r"empty.jsonl: empty validation set"),
    (lambda d: (d / "t.jsonl").write_text('{"input": "a", "target": "b"}\n'), ["--eval-metric", "blue"],
     r"--eval-metric 'blue': expected one of loss, bleu"),
    (lambda d: (d / "t.jsonl").write_text('{"input": "a", "target": "b"}\n'), ["--freeze", "head"],
     r"--freeze 'head': expected one of encoder, decoder, embeddings"),
    (lambda d: (d / "t.jsonl").write_text('{"input": "a", "target": "b"}\n'), ["--model", "NOTOK"],
     r"no tokenizer found.*pass --tokenizer DIR"),
])
def test_finetune_bad_input(tasks, tmp_path, capsys, write, args, message):
    import re
    import shutil
    write(tmp_path)
    data = next(p for p in tmp_path.iterdir() if p.name.startswith("t."))
    (tmp_path / "empty.jsonl").write_text("\n")
    notok = tmp_path / "notok"
    shutil.copytree(tasks / "model", notok)
    for f in ("spiece.model", "tokenizer.json", "tokenizer_config.json"):
        os.remove(notok / f)
    args = [str(tmp_path / "empty.jsonl") if a == "EMPTY" else str(notok) if a == "NOTOK" else a for a in args]
    argv = ["finetune", "--model", str(tasks / "model"), "--train", str(data), "--save", str(tmp_path / "s"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "s" / "checkpoints").exists()


def test_evaluate_bad_metric(tasks, capsys):
    assert main(["evaluate", "--model", str(tasks / "model"), "--data", str(tasks / "copy_test.jsonl"),
                 "--metric", "bleu", "rogue"]) == 2
    assert "unknown metric 'rogue': expected one of bleu, chrf, rouge, exact_match, accuracy" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (None, r"missing.txt: corpus file not found"),
    (b"", r"empty corpus: no text in .*c.txt"),
    (b"\n  \n", r"empty corpus: no text in .*c.txt"),
    (b"good line of text\nthe bad byte is \xff here\n", r"c.txt: line 2 is not UTF-8 \(byte offset 34\)"),
])
def test_pretrain_bad_corpus_is_named_before_sentencepiece(tmp_path, capsys, content, message):
    """No --tokenizer: the corpus is checked before SentencePiece sees it (issue 7's new-user run)."""
    import re
    path = tmp_path / ("missing.txt" if content is None else "c.txt")
    if content is not None:
        path.write_bytes(content)
    assert main(["pretrain", "--data-path", str(path), "--save", str(tmp_path / "run"), "--model-preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Vocabulary size" not in err and "sentences_" not in err
    assert not (tmp_path / "run" / "tokenizer").exists()

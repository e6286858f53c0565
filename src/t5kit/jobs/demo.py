"""`t5kit demo`: one small T5, several tasks chosen by a text prefix, from scratch in minutes: the
README's main job, and the text-to-text idea at work (T5 paper section 2.4).

The embedded corpus (World English Bible and Louis Segond 1910, aligned by verse) is split by whole
books and gives three tasks: "translate English to French: ", "translate French to English: " and
"language: " (is this verse English or French?). One SentencePiece tokenizer learns both languages
from the training books; a short span-corruption pretraining on that text is followed by
fine-tuning on the mixture of the three tasks (packed, examples-proportional), then each task is
scored on the held-out books: BLEU and chrF, greedy and beam 4, for translation; accuracy for the
language. Step counts come from the time budget: the step time of each stage is measured first, on
this machine and device. <save>/report.md holds the per-task figures, samples, loss curves and the
commands that redo each stage.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..atomic import write_text
from ..data.embedded import write_parallel_corpus, write_task_files
from ..data.tokenizer import train_tokenizer
from ..options import option, to_flags
from .evaluate import EvalConfig, evaluate
from .finetune import FinetuneConfig, finetune
from .pretrain import PretrainConfig, pretrain


@dataclass(frozen=True)
class Task:
    name: str                 # its folder under <save>/data
    title: str
    prefix: str
    metrics: tuple[str, ...]
    beams: tuple[int, ...]    # decodings scored on the test books
    max_new_tokens: int | None = None  # None: the demo's --max-length


TASKS = (Task("en_fr", "English -> French", "translate English to French: ", ("bleu", "chrf"), (1, 4)),
         Task("fr_en", "French -> English", "translate French to English: ", ("bleu", "chrf"), (1, 4)),
         Task("language", "language of a verse", "language: ", ("accuracy",), (1,), max_new_tokens=8))
EVAL_SHARE = 0.16  # of the budget, for decoding the test books (every task, greedy and beam 4)
VALID_PER_TASK = 200  # validation examples of each task in the mixture's validation loss


def task_file(data: str, task: Task, split: str) -> str:
    return os.path.join(data, task.name, f"{split}.jsonl")


def write_valid_mixture(data: str, path: str) -> int:
    """The first VALID_PER_TASK validation examples of every task, prefixes included, in one file
    (fine-tuning validates by the loss on all tasks at once). -> number of examples."""
    rows = []
    for task in TASKS:
        with open(task_file(data, task, "valid"), encoding="utf-8") as f:
            for line in f.readlines()[:VALID_PER_TASK]:
                r = json.loads(line)
                rows.append(json.dumps({"input": task.prefix + r["input"], "target": r["target"]},
                                       ensure_ascii=False) + "\n")
    write_text(path, "".join(rows))
    return len(rows)


@dataclass
class DemoConfig:
    save: str = "runs/demo"
    minutes: float = option("wall-clock budget for the whole run", default=15.0)
    preset: str = option("model preset (see t5kit.PRESETS)", default="micro")
    device: str = "cpu"
    bf16: bool = False
    no_pretrain: bool = option("skip pretraining: fine-tune from random weights for the same total time",
                               default=False)
    pretrain_share: float = option("share of the training time spent pretraining (EN -> FR alone, 15 CPU "
                                   "minutes, greedy test BLEU: 0.4 -> 1.2, 0.1 -> 2.1, none -> 3.5: the corpus is "
                                   "the fine-tuning text)", default=0.1)
    vocab_size: int = 8000
    micro_batch_size: int = 32
    pretrain_lr: float = 2e-3
    finetune_lr: float = 2e-3
    max_length: int = option("input and target tokens kept per verse", default=128)
    test_examples: int | None = option("score the first N test examples of each task (default: all of the "
                                       "held-out books)", default=None)
    seed: int = 1234


def _say(msg: str) -> None:
    print(f"t5kit demo: {msg}", file=sys.stderr, flush=True)


def step_seconds(preset: str, vocab: int, batch: int, inputs: int, targets: int, device: str, bf16: bool) -> float:
    """Median time of a training step at these shapes, after warm-up, with the loop's own pieces
    (loss_terms, the fused AdamW of build_optimizer): a plain torch AdamW runs a per-tensor loop on
    CPU and made this estimate 1.5x too slow."""
    import torch

    from ..data.tasks import collate
    from ..model.config import get_preset
    from ..model.t5 import T5
    from ..training.loop import _autocast, _tensors, loss_terms
    from ..training.optim import OptimConfig, build_optimizer

    model = T5(get_preset(preset).replace(vocab_size=vocab, dropout_rate=0.0)).to(device)  # as both stages train
    opt = build_optimizer(model, OptimConfig())
    rng = np.random.default_rng(0)
    rows = [[(rng.integers(3, vocab, inputs, dtype=np.int32), rng.integers(3, vocab, targets, dtype=np.int32))]
            for _ in range(batch)]
    b = _tensors(collate(rows, pad=0), device)
    times = []
    for _ in range(8):
        t = time.perf_counter()
        with _autocast(device, bf16):
            loss, n, _ = loss_terms(model, b)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.median(times[2:]))


def demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """-> per-task test scores ({task: {"greedy": {...}, "beam4": {...}}}), the stages' step counts
    and the report path."""
    if not 0.0 <= cfg.pretrain_share < 1.0:
        raise ValueError(f"--pretrain-share {cfg.pretrain_share}: expected a value in [0, 1)")
    start = time.perf_counter()
    deadline = start + 60 * cfg.minutes
    out = cfg.save
    data = os.path.join(out, "data")
    parallel = os.path.join(data, "en_fr")
    split = write_parallel_corpus(parallel, seed=0)
    split["tasks"] = {"en_fr": {k: split[k] for k in ("train", "valid", "test")},
                      **write_task_files(parallel, data, seed=0)}
    _say(f"{split['train']:,} / {split['valid']:,} / {split['test']:,} verse pairs for train / valid / test; "
         f"held-out books: valid {split['valid_books']}, test {split['test_books']}")
    tok_dir = os.path.join(out, "tokenizer")
    pretrain_txt = os.path.join(parallel, "pretrain.txt")
    tok = train_tokenizer([pretrain_txt], cfg.vocab_size, tok_dir)
    commands = {"tokenizer": ["t5kit", "tokenizer", "train", "--input", pretrain_txt, "--vocab-size",
                              str(cfg.vocab_size), "--out", tok_dir]}
    vocab = -(-len(tok) // 128) * 128

    # budgets: EVAL_SHARE of the whole run for testing; pretraining gets cfg.pretrain_share of the
    # training time; fine-tuning's step count is set when pretraining is done, from the time left.
    # Fine-tuning packs examples into rows of the full --max-length: its step has that shape.
    common = dict(preset=cfg.preset, vocab=vocab, batch=cfg.micro_batch_size, device=cfg.device, bf16=cfg.bf16)
    ft_step = step_seconds(inputs=cfg.max_length, targets=cfg.max_length, **common)
    pt_step = step_seconds(inputs=128, targets=29, **common)  # span corruption: 128 inputs -> 29 targets
    train_end = deadline - EVAL_SHARE * 60 * cfg.minutes
    pt_iters = 0 if cfg.no_pretrain else int(cfg.pretrain_share * (train_end - time.perf_counter()) / pt_step)
    _say(f"step time {pt_step:.3f} s (pretrain) / {ft_step:.3f} s (fine-tune); {pt_iters} pretraining steps")
    stages = {}  # stage -> seconds

    def lap(stage: str) -> None:
        stages[stage] = time.perf_counter() - start - sum(stages.values())

    lap("data and tokenizer")

    pcfg = PretrainConfig(data_path=[pretrain_txt], tokenizer=tok_dir, model_preset=cfg.preset, seq_length=128,
                          micro_batch_size=cfg.micro_batch_size, train_iters=pt_iters, lr=cfg.pretrain_lr,
                          lr_warmup_iters=min(200, pt_iters // 10), eval_interval=max(1, -(-pt_iters // 10)),
                          save_interval=0, log_interval=10, bf16=cfg.bf16, device=cfg.device, seed=cfg.seed,
                          save=os.path.join(out, "pretrain"))
    pretrain(pcfg, progress=progress)  # with --no-pretrain: 0 steps, the initial weights
    commands["pretrain"] = ["t5kit", "pretrain", *to_flags(pcfg)]
    lap("pretrain")
    ft_iters = max(1, int(0.95 * (train_end - time.perf_counter()) / ft_step))  # 5%: validation loss
    _say(f"{ft_iters} fine-tuning steps on {', '.join(t.title for t in TASKS)}")
    valid = os.path.join(data, "valid_mixture.jsonl")
    write_valid_mixture(data, valid)
    fcfg = FinetuneConfig(model=os.path.join(pcfg.save, "final"),
                          train=[f"{task_file(data, t, 'train')}:{t.prefix}" for t in TASKS], valid=valid,
                          pack=True, max_input_length=cfg.max_length, max_target_length=cfg.max_length,
                          micro_batch_size=cfg.micro_batch_size, train_iters=ft_iters, lr=cfg.finetune_lr,
                          lr_warmup_iters=min(200, ft_iters // 10),
                          # a minutes-long run sees the data about twice and underfits: measured on 5-minute
                          # runs, no dropout / label smoothing gave lower validation loss than 0.1 / 0.1
                          dropout=0.0, label_smoothing=0.0, eval_interval=-(-ft_iters // 4), eval_metric="loss",
                          save_interval=0, bf16=cfg.bf16, device=cfg.device, seed=cfg.seed,
                          save=os.path.join(out, "finetune"))
    ft = finetune(fcfg, progress=progress)
    commands["finetune"] = ["t5kit", "finetune", *to_flags(fcfg)]
    lap("finetune")

    scores: dict[str, dict[str, dict]] = {}
    for task in TASKS:
        for beams in task.beams:
            decoding = "greedy" if beams == 1 else f"beam{beams}"
            name = f"{task.name}_{decoding}"
            ecfg = EvalConfig(model=ft["best_dir"], data=task_file(data, task, "test"), prefix=task.prefix,
                              metric=list(task.metrics), num_beams=beams,
                              max_new_tokens=task.max_new_tokens or cfg.max_length, max_input_length=cfg.max_length,
                              max_examples=cfg.test_examples, device=cfg.device,
                              predictions=os.path.join(out, f"test_{name}.jsonl"),
                              output=os.path.join(out, f"test_{name}.json"))
            scores.setdefault(task.name, {})[decoding] = evaluate(ecfg, progress=progress)
            commands[f"evaluate ({task.title}, {decoding})"] = ["t5kit", "evaluate", *to_flags(ecfg)]
            _say(f"test {task.title} {decoding}: {_figures(scores[task.name][decoding], task)}")
    lap("test")
    minutes = (time.perf_counter() - start) / 60
    samples = {task.name: _samples(os.path.join(out, f"test_{task.name}_greedy.jsonl"), task) for task in TASKS}
    for s in (s for rows in samples.values() for s in rows):  # inputs carry their prefix
        _say(f"\n  IN  {s['input']}\n  REF {s['target']}\n  OUT {s['prediction']}")
    plot = plot_losses({"pretrain": pcfg.save, "finetune": fcfg.save}, os.path.join(out, "loss_curves.png"))
    report = write_report(out, cfg, split, scores, samples, commands, stages, plot,
                          {"pretrain": pt_iters, "finetune": ft_iters, "best_step": ft.get("best_step")})
    _say(f"{minutes:.1f} min; report in {report}")
    return {"test": scores, "pretrain_iters": pt_iters, "finetune_iters": ft_iters, "best_step": ft.get("best_step"),
            "minutes": round(minutes, 2), "stage_minutes": {k: round(v / 60, 2) for k, v in stages.items()},
            "report": report}


def _figures(scores: dict, task: Task) -> str:
    names = {"bleu": "BLEU", "chrf": "chrF", "accuracy": "accuracy"}
    return ", ".join(f"{names[m]} {scores[m]:.2f}" for m in task.metrics)


def _samples(predictions: str, task: Task, n: int = 3) -> list[dict]:
    """n predictions spread over the test set (the language task: its first n of each answer)."""
    with open(predictions, encoding="utf-8") as f:
        preds = [json.loads(line) for line in f]
    if task.name == "language":
        return [p for label in ("English", "French") for p in [p for p in preds if p["target"] == label][:2]]
    return [preds[i] for i in np.linspace(0, len(preds) - 1, n).astype(int)]


def plot_losses(runs: dict[str, str], path: str) -> str:
    """Training and validation loss against step, one panel per stage, from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_path

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    for ax, (stage, folder) in zip(axes[0], runs.items()):
        log = os.path.join(folder, "metrics.jsonl")
        rows = [json.loads(line) for line in open(log, encoding="utf-8")] if os.path.isfile(log) else []
        for key, label in (("loss", "train"), ("eval_loss", "validation")):
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), label=label, marker="." if key == "eval_loss" else None)
        ax.set(title=stage, xlabel="step", ylabel="loss (nats / target token)")
        ax.legend() if rows else ax.text(0.5, 0.5, "skipped", ha="center")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def write_report(out: str, cfg: DemoConfig, split: dict, scores: dict, samples: dict, commands: dict,
                 stages: dict, plot: str, steps: dict) -> str:
    by_name = {t.name: t for t in TASKS}
    lines = [
        "# t5kit demo: one model, three tasks chosen by a prefix", "",
        f"{sum(stages.values()) / 60:.1f} minutes (" + ", ".join(f"{k} {v / 60:.1f}" for k, v in stages.items())
        + f") on `{cfg.device}`{' (bf16)' if cfg.bf16 else ''}; preset `{cfg.preset}`; "
        f"pretraining {steps['pretrain']} steps, fine-tuning {steps['finetune']} steps on the mixture "
        f"(best validation loss at step {steps['best_step']}).", "",
        f"Data: World English Bible and Louis Segond 1910, aligned by verse: {split['train']:,} training, "
        f"{split['valid']:,} validation (books {split['valid_books']}) and {split['test']:,} test verses "
        f"(books {split['test_books']}); test books are seen by no stage, tokenizer included.", "",
        "| task | prefix | training examples | decoding | test scores | test examples |", "|---|---|---|---|---|---|",
        *(f"| {by_name[t].title} | `{by_name[t].prefix}` | {split['tasks'][t]['train']:,} | {d} | "
          f"{_figures(s, by_name[t])} | {s['n_examples']} |" for t, per in scores.items() for d, s in per.items()),
        "", f"sacrebleu: `{scores['en_fr']['greedy']['sacrebleu_signature']}`", "",
        "## Samples (greedy, test books)", "",
        *(f"- {s['input']}\n  - reference: {s['target']}\n  - t5kit: {s['prediction']}"
          for rows in samples.values() for s in rows), "",
        "## Loss curves", "", f"![loss curves]({os.path.basename(plot)})", "",
        "## Reproduce each stage", "", "```bash",
        *(f"# {stage}\n{shlex.join(cmd)}" for stage, cmd in commands.items()), "```", ""]
    path = os.path.join(out, "report.md")
    write_text(path, "\n".join(lines))
    return path

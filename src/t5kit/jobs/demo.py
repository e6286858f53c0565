"""`t5kit demo`: one small T5, several tasks chosen by a text prefix, from scratch in minutes: the
README's main job, and the text-to-text idea at work (T5 paper section 2.4).

The embedded corpus (World English Bible and Louis Segond 1910, aligned by verse) is split by whole
books and gives three tasks: "translate English to French: ", "translate French to English: " and
"language: " (is this verse English or French?). One SentencePiece tokenizer learns both languages
from the training books; a short span-corruption pretraining on that text is followed by
fine-tuning on the mixture of the three tasks (packed, examples-proportional), then each task is
scored on the held-out books: BLEU and chrF, greedy and beam 4, for translation; accuracy for the
language. Step counts come from the time budget, and follow the clock: each stage's count is fixed
when the stage starts, from the time then left (`plan`). <save>/report.md holds the per-task
figures, samples, loss curves, how the budget was spent (planned and actual, per stage) and the
commands that redo each stage.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..atomic import write_text
from ..data.embedded import write_parallel_corpus, write_task_files
from ..data.spans import random_spans_helper
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
EVAL_SHARE = 0.16  # of the budget, kept for decoding the test books (every task, greedy and beam 4)
VALID_SHARE = 0.05  # of fine-tuning's time, kept for its validation losses, set-up and exports
MEASURE_SHARE = 0.01  # of the budget, for measuring a stage's step time (4 to 8 steps)
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


def step_seconds(preset: str, vocab: int, batch: int, inputs: int, targets: int, device: str, bf16: bool,
                 limit_s: float = math.inf) -> float:
    """Median time of a training step at these shapes, after two warm-up steps, with the loop's own
    pieces (loss_terms, the fused AdamW of build_optimizer, the gradient clipping) on fixed-shape
    rows with segment ids, as both stages' packed rows are: a plain torch AdamW runs a per-tensor
    loop on CPU and made this estimate 1.5x too slow; the segment mask costs fine-tuning's step ~6%
    on CPU. Six timed steps, or two once `limit_s` has passed (a machine shared with other jobs
    can make each step many times slower)."""
    import torch

    from ..data.tasks import collate
    from ..model.config import get_preset
    from ..model.t5 import T5
    from ..training.loop import _autocast, _tensors
    from ..training.loss import loss_terms
    from ..training.optim import OptimConfig, build_optimizer
    from ..training.parallel import clip_grad_norm

    model = T5(get_preset(preset).replace(vocab_size=vocab, dropout_rate=0.0)).to(device)  # as both stages train
    opt = build_optimizer(model, OptimConfig())
    rng = np.random.default_rng(0)
    rows = [[(rng.integers(3, vocab, inputs, dtype=np.int32), rng.integers(3, vocab, targets, dtype=np.int32))]
            for _ in range(batch)]
    b = _tensors(collate(rows, pad=0, shape=(inputs, targets)), device)
    times, start = [], time.perf_counter()
    while len(times) < 8 and (len(times) < 4 or time.perf_counter() - start < limit_s):
        t = time.perf_counter()
        with _autocast(device, bf16):
            loss, n, _ = loss_terms(model, b)
        (loss / n).backward()
        clip_grad_norm(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.median(times[2:]))


def loop_seconds(folder: str, tokens_per_step: int) -> float:
    """Seconds the training loop of a finished stage ran, its evaluations included (set-up and
    export not), from <folder>/metrics.jsonl: each row's tokens_per_s counts the input and label
    positions of the steps since the row before (training/loop.py), `tokens_per_step` of them a
    step in fixed-shape packed rows."""
    seconds, last = 0.0, 0
    with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
        for row in map(json.loads, f):
            seconds += (row["step"] - last) * tokens_per_step / row["tokens_per_s"]
            last = row["step"]
    return seconds


def plan(seconds: float, step_s: float, spend: float = 1.0, least: int = 0) -> dict:
    """A training stage's plan, fixed when it starts: `seconds` of the budget, `spend` of them on
    steps of `step_s` seconds, at least `least` steps. The step count sets the stage's LR schedule.

    >>> plan(100.0, 0.3, spend=0.95)
    {'planned_s': 100.0, 'step_s': 0.3, 'steps': 316}
    """
    seconds = max(seconds, 0.0)  # a stage that starts after its time is up still runs its `least` steps
    return {"planned_s": seconds, "step_s": step_s, "steps": max(least, int(spend * seconds / step_s))}


def demo(cfg: DemoConfig, progress: bool = True) -> dict:
    """-> per-task test scores ({task: {"greedy": {...}, "beam4": {...}}}), the stages' step counts,
    how the budget was spent (per stage: planned and actual seconds, steps, step times) and the
    report path."""
    if not 0.0 <= cfg.pretrain_share < 1.0:
        raise ValueError(f"--pretrain-share {cfg.pretrain_share}: expected a value in [0, 1)")
    clock = Clock()
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

    # The budget follows the clock. EVAL_SHARE of it is kept for testing; each training stage's step
    # count is fixed when the stage starts (it sets the LR schedule), from the training time left
    # then and its step time measured then: pretraining gets --pretrain-share of that time,
    # fine-tuning all that is left when pretraining ends, so a stage that ran ahead of or behind its
    # plan moves the next one, and a step time measured while another job held the machine (issue
    # 17: 1.6 s for a 0.49 s step) misplans one stage only. Both stages train on fixed-shape packed
    # rows: span corruption's 128 inputs -> 29 targets, fine-tuning's full --max-length.
    shapes = {"pretrain": (128, random_spans_helper(128)[1]), "finetune": (cfg.max_length, cfg.max_length)}

    def measure(stage: str) -> float:
        return step_seconds(cfg.preset, vocab, cfg.micro_batch_size, *shapes[stage], cfg.device, cfg.bf16,
                            limit_s=MEASURE_SHARE * 60 * cfg.minutes)

    train_end = clock.start + 60 * cfg.minutes * (1 - EVAL_SHARE)
    pretraining = not cfg.no_pretrain and cfg.pretrain_share > 0
    pt_step = measure("pretrain") if pretraining else 0.0
    clock.lap("data, tokenizer, step time")
    pt = plan(cfg.pretrain_share * (train_end - time.perf_counter()), pt_step, least=1) if pretraining else \
        {"planned_s": 0.0, "step_s": None, "steps": 0}
    pt_iters = pt["steps"]
    _say(f"{pt_iters} pretraining steps of {pt_step:.3f} s")
    pcfg = PretrainConfig(data_path=[pretrain_txt], tokenizer=tok_dir, model_preset=cfg.preset, seq_length=128,
                          micro_batch_size=cfg.micro_batch_size, train_iters=pt_iters, lr=cfg.pretrain_lr,
                          lr_warmup_iters=min(200, pt_iters // 10), eval_interval=max(1, -(-pt_iters // 10)),
                          save_interval=0, log_interval=10, bf16=cfg.bf16, device=cfg.device, seed=cfg.seed,
                          save=os.path.join(out, "pretrain"))
    fresh_metrics(pcfg.save)
    pretrain(pcfg, progress=progress)  # with --no-pretrain: 0 steps, the initial weights
    commands["pretrain"] = ["t5kit", "pretrain", *to_flags(pcfg)]
    clock.lap("pretrain", **pt, loop_s=loop_seconds(pcfg.save, cfg.micro_batch_size * sum(shapes["pretrain"]))
              if pt_iters else None)

    ft_step = measure("finetune")
    ft = plan(train_end - time.perf_counter(), ft_step, spend=1 - VALID_SHARE, least=1)
    ft_iters = ft["steps"]
    _say(f"{ft_iters} fine-tuning steps of {ft['step_s']:.3f} s on {', '.join(t.title for t in TASKS)}")
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
    fresh_metrics(fcfg.save)
    ft_row = finetune(fcfg, progress=progress)
    commands["finetune"] = ["t5kit", "finetune", *to_flags(fcfg)]
    clock.lap("finetune", **ft, loop_s=loop_seconds(fcfg.save, cfg.micro_batch_size * sum(shapes["finetune"])))

    scores: dict[str, dict[str, dict]] = {}
    for task in TASKS:
        for beams in task.beams:
            decoding = "greedy" if beams == 1 else f"beam{beams}"
            name = f"{task.name}_{decoding}"
            ecfg = EvalConfig(model=ft_row["best_dir"], data=task_file(data, task, "test"), prefix=task.prefix,
                              metric=list(task.metrics), num_beams=beams,
                              max_new_tokens=task.max_new_tokens or cfg.max_length, max_input_length=cfg.max_length,
                              max_examples=cfg.test_examples, device=cfg.device,
                              predictions=os.path.join(out, f"test_{name}.jsonl"),
                              output=os.path.join(out, f"test_{name}.json"))
            scores.setdefault(task.name, {})[decoding] = evaluate(ecfg, progress=progress)
            commands[f"evaluate ({task.title}, {decoding})"] = ["t5kit", "evaluate", *to_flags(ecfg)]
            _say(f"test {task.title} {decoding}: {_figures(scores[task.name][decoding], task)}")
    clock.lap("test", planned_s=EVAL_SHARE * 60 * cfg.minutes)
    samples = {task.name: _samples(os.path.join(out, f"test_{task.name}_greedy.jsonl"), task) for task in TASKS}
    for s in (s for rows in samples.values() for s in rows):  # inputs carry their prefix
        _say(f"\n  IN  {s['input']}\n  REF {s['target']}\n  OUT {s['prediction']}")
    plot = plot_losses({"pretrain": pcfg.save, "finetune": fcfg.save}, os.path.join(out, "loss_curves.png"))
    report = write_report(out, cfg, split, scores, samples, commands, clock.stages, plot, ft_row["best_step"])
    minutes = clock.total() / 60
    _say(f"{minutes:.1f} of {cfg.minutes:g} min; report in {report}")
    return {"test": scores, "pretrain_iters": pt_iters, "finetune_iters": ft_iters, "best_step": ft_row["best_step"],
            "minutes": round(minutes, 2), "budget": clock.stages, "report": report}


class Clock:
    """Where the budget went: per stage, its plan (set when it started) and the seconds it took."""

    def __init__(self):
        self.start = self.mark = time.perf_counter()
        self.stages: dict[str, dict] = {}

    def lap(self, stage: str, **plan) -> None:
        now = time.perf_counter()
        self.stages[stage] = {**plan, "actual_s": now - self.mark}
        self.mark = now

    def total(self) -> float:
        return sum(s["actual_s"] for s in self.stages.values())


def fresh_metrics(folder: str) -> None:
    """Each stage of the demo starts afresh, also when --save holds an earlier run's: its
    metrics.jsonl, to which the training loop appends, goes with the rest (loop_seconds and the
    loss curves read this run's rows only)."""
    path = os.path.join(folder, "metrics.jsonl")
    if os.path.isfile(path):
        os.remove(path)


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
                 stages: dict, plot: str, best_step: int | None) -> str:
    by_name = {t.name: t for t in TASKS}
    total = sum(s["actual_s"] for s in stages.values())
    lines = [
        "# t5kit demo: one model, three tasks chosen by a prefix", "",
        f"{total / 60:.1f} of {cfg.minutes:g} minutes on `{cfg.device}`{' (bf16)' if cfg.bf16 else ''}; preset "
        f"`{cfg.preset}`; pretraining {stages['pretrain']['steps']} steps, fine-tuning {stages['finetune']['steps']} "
        f"steps on the mixture (best validation loss at step {best_step}).", "",
        f"Data: World English Bible and Louis Segond 1910, aligned by verse: {split['train']:,} training, "
        f"{split['valid']:,} validation (books {split['valid_books']}) and {split['test']:,} test verses "
        f"(books {split['test_books']}); test books are seen by no stage, tokenizer included.", "",
        "| task | prefix | training examples | decoding | test scores | test examples |", "|---|---|---|---|---|---|",
        *(f"| {by_name[t].title} | `{by_name[t].prefix}` | {split['tasks'][t]['train']:,} | {d} | "
          f"{_figures(s, by_name[t])} | {s['n_examples']} |" for t, per in scores.items() for d, s in per.items()),
        "", f"sacrebleu: `{scores['en_fr']['greedy']['sacrebleu_signature']}`", "",
        *budget_lines(stages, 60 * cfg.minutes), "",
        "## Samples (greedy, test books)", "",
        *(f"- {s['input']}\n  - reference: {s['target']}\n  - t5kit: {s['prediction']}"
          for rows in samples.values() for s in rows), "",
        "## Loss curves", "", f"![loss curves]({os.path.basename(plot)})", "",
        "## Reproduce each stage", "", "```bash",
        *(f"# {stage}\n{shlex.join(cmd)}" for stage, cmd in commands.items()), "```", ""]
    path = os.path.join(out, "report.md")
    write_text(path, "\n".join(lines))
    return path


def budget_lines(stages: dict, budget_s: float) -> list[str]:
    """The report's account of the budget: per stage, the seconds planned when it started and
    those it took, its steps, and the step time it was planned with against its loop's own."""

    def minutes(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds / 60:.2f}"

    def step(seconds: float | None) -> str:
        return "-" if seconds is None else f"{seconds:.3f}"

    rows = [f"| {name} | {minutes(s.get('planned_s'))} | {minutes(s['actual_s'])} | {s.get('steps', '-')} | "
            f"{step(s.get('step_s'))} | {step(s['loop_s'] / s['steps'] if s.get('steps') else None)} |"
            for name, s in stages.items()]
    return ["## Time budget", "",
            "Planned: the stage's share of the budget when it started (the data and tokenizer take what they "
            "take; testing keeps its share), and its step count from the step time measured then. Actual: the "
            "clock, and the training loop's own seconds per step, its evaluations included.", "",
            "| stage | planned (min) | actual (min) | steps | planned s/step | actual s/step |",
            "|---|---|---|---|---|---|",
            *rows, f"| total | {minutes(budget_s)} | {minutes(sum(s['actual_s'] for s in stages.values()))} | | | |"]

"""`t5kit demo`: English -> French from scratch in minutes, the README's main job.

The embedded corpus (World English Bible and Louis Segond 1910, aligned by verse) is split by whole
books; one SentencePiece tokenizer learns both languages from the training books; a short
span-corruption pretraining on that text is followed by fine-tuning on "translate English to
French: ", then BLEU and chrF on the held-out books, greedy and beam 4. Step counts come from the
time budget: the step time of each stage is measured first, on this machine and device.
<save>/report.md holds the figures, samples, loss curves and the commands that redo each stage.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..data.embedded import write_parallel_corpus
from ..data.tokenizer import train_tokenizer
from ..options import option, to_flags
from .evaluate import EvalConfig, evaluate
from .finetune import FinetuneConfig, finetune
from .pretrain import PretrainConfig, pretrain

PREFIX = "translate English to French: "
EVAL_SHARE = 0.08  # of the budget, for greedy and beam-4 decoding of the test books


@dataclass
class DemoConfig:
    save: str = "runs/demo"
    minutes: float = option("wall-clock budget for the whole run", default=15.0)
    preset: str = option("model preset (see t5kit.PRESETS)", default="micro")
    device: str = "cpu"
    bf16: bool = False
    no_pretrain: bool = option("skip pretraining: fine-tune from random weights for the same total time",
                               default=False)
    pretrain_share: float = option("share of the training time spent pretraining (15 CPU minutes, greedy test "
                                   "BLEU: 0.4 -> 1.2, 0.1 -> 2.1, none -> 3.5: the corpus is the fine-tuning text)",
                                   default=0.1)
    vocab_size: int = 8000
    micro_batch_size: int = 32
    pretrain_lr: float = 2e-3
    finetune_lr: float = 2e-3
    max_length: int = option("input and target tokens kept per verse", default=128)
    test_examples: int | None = option("score the first N test verses (default: all of the held-out books)",
                                       default=None)
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
    """-> the test scores (greedy and beam 4), the stages' step counts and the report path."""
    if not 0.0 <= cfg.pretrain_share < 1.0:
        raise ValueError(f"--pretrain-share {cfg.pretrain_share}: expected a value in [0, 1)")
    start = time.perf_counter()
    deadline = start + 60 * cfg.minutes
    out = cfg.save
    data = os.path.join(out, "data")
    split = write_parallel_corpus(data, seed=0)
    _say(f"{split['train']:,} / {split['valid']:,} / {split['test']:,} verse pairs for train / valid / test; "
         f"held-out books: valid {split['valid_books']}, test {split['test_books']}")
    tok_dir = os.path.join(out, "tokenizer")
    pretrain_txt = os.path.join(data, "pretrain.txt")
    tok = train_tokenizer([pretrain_txt], cfg.vocab_size, tok_dir)
    commands = {"tokenizer": ["t5kit", "tokenizer", "train", "--input", pretrain_txt, "--vocab-size",
                              str(cfg.vocab_size), "--out", tok_dir]}
    vocab = -(-len(tok) // 128) * 128

    # budgets: EVAL_SHARE of the whole run for testing; pretraining gets cfg.pretrain_share of the
    # training time; fine-tuning's step count is set when pretraining is done, from the time left
    with open(os.path.join(data, "train.jsonl"), encoding="utf-8") as f:
        lengths = [(len(tok.encode(PREFIX + r["input"])), len(tok.encode(r["target"])))
                   for r in map(json.loads, f)]
    typical_in, typical_tg = (min(cfg.max_length, int(np.percentile([x[k] for x in lengths], 75))) for k in (0, 1))
    common = dict(preset=cfg.preset, vocab=vocab, batch=cfg.micro_batch_size, device=cfg.device, bf16=cfg.bf16)
    ft_step = step_seconds(inputs=typical_in, targets=typical_tg, **common)
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
    ft_iters = max(1, int(0.9 * (train_end - time.perf_counter()) / ft_step))  # 10%: validation BLEU
    _say(f"{ft_iters} fine-tuning steps")
    fcfg = FinetuneConfig(model=os.path.join(pcfg.save, "final"), train=[os.path.join(data, "train.jsonl")],
                          valid=os.path.join(data, "valid.jsonl"), prefix=PREFIX, max_input_length=cfg.max_length,
                          max_target_length=cfg.max_length, micro_batch_size=cfg.micro_batch_size,
                          train_iters=ft_iters, lr=cfg.finetune_lr, lr_warmup_iters=min(200, ft_iters // 10),
                          # a minutes-long run sees the data about twice and underfits: measured on 5-minute
                          # runs, no dropout / label smoothing gave lower validation loss than 0.1 / 0.1
                          dropout=0.0, label_smoothing=0.0, eval_interval=-(-ft_iters // 4), eval_metric="bleu",
                          eval_max_examples=100, save_interval=0, bf16=cfg.bf16, device=cfg.device, seed=cfg.seed,
                          save=os.path.join(out, "finetune"))
    ft = finetune(fcfg, progress=progress)
    commands["finetune"] = ["t5kit", "finetune", *to_flags(fcfg)]
    lap("finetune")

    scores = {}
    for name, beams in (("greedy", 1), ("beam4", 4)):
        ecfg = EvalConfig(model=ft["best_dir"], data=os.path.join(data, "test.jsonl"), prefix=PREFIX,
                          metric=["bleu", "chrf"], num_beams=beams, max_new_tokens=cfg.max_length,
                          max_input_length=cfg.max_length, max_examples=cfg.test_examples, device=cfg.device,
                          predictions=os.path.join(out, f"test_{name}.jsonl"),
                          output=os.path.join(out, f"test_{name}.json"))
        scores[name] = evaluate(ecfg, progress=progress)
        commands[f"evaluate ({name})"] = ["t5kit", "evaluate", *to_flags(ecfg)]
        _say(f"test {name}: BLEU {scores[name]['bleu']:.2f}, chrF {scores[name]['chrf']:.2f}")
    lap("test")
    minutes = (time.perf_counter() - start) / 60
    with open(os.path.join(out, "test_greedy.jsonl"), encoding="utf-8") as f:
        preds = [json.loads(line) for line in f]
    samples = [preds[i] for i in np.linspace(0, len(preds) - 1, 5).astype(int)]
    for s in samples:
        _say(f"\n  EN  {s['input'].removeprefix(PREFIX)}\n  REF {s['target']}\n  OUT {s['prediction']}")
    plot = plot_losses({"pretrain": pcfg.save, "finetune": fcfg.save}, os.path.join(out, "loss_curves.png"))
    report = write_report(out, cfg, split, scores, samples, commands, stages, plot,
                          {"pretrain": pt_iters, "finetune": ft_iters, "best_step": ft.get("best_step")})
    _say(f"{minutes:.1f} min; report in {report}")
    return {"test": scores, "pretrain_iters": pt_iters, "finetune_iters": ft_iters, "best_step": ft.get("best_step"),
            "minutes": round(minutes, 2), "stage_minutes": {k: round(v / 60, 2) for k, v in stages.items()},
            "report": report}


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


def write_report(out: str, cfg: DemoConfig, split: dict, scores: dict, samples: list[dict], commands: dict,
                 stages: dict, plot: str, steps: dict) -> str:
    from ..atomic import write_text
    lines = [
        "# t5kit demo: English -> French", "",
        f"{sum(stages.values()) / 60:.1f} minutes (" + ", ".join(f"{k} {v / 60:.1f}" for k, v in stages.items())
        + f") on `{cfg.device}`{' (bf16)' if cfg.bf16 else ''}; preset `{cfg.preset}`; "
        f"pretraining {steps['pretrain']} steps, fine-tuning {steps['finetune']} steps "
        f"(best validation BLEU at step {steps['best_step']}).", "",
        f"Data: World English Bible -> Louis Segond 1910, aligned by verse: {split['train']:,} training, "
        f"{split['valid']:,} validation (books {split['valid_books']}) and {split['test']:,} test verses "
        f"(books {split['test_books']}); test books are seen by no stage, tokenizer included.", "",
        "| decoding | BLEU | chrF | test verses |", "|---|---|---|---|",
        *(f"| {name} | {s['bleu']:.2f} | {s['chrf']:.2f} | {s['n_examples']} |" for name, s in scores.items()), "",
        f"sacrebleu: `{scores['greedy']['sacrebleu_signature']}`", "",
        "## Samples (greedy, test books)", "",
        *(f"- EN: {s['input'].removeprefix(PREFIX)}\n  - reference: {s['target']}\n  - t5kit: {s['prediction']}"
          for s in samples), "",
        "## Loss curves", "", f"![loss curves]({os.path.basename(plot)})", "",
        "## Reproduce each stage", "", "```bash",
        *(f"# {stage}\n{shlex.join(cmd)}" for stage, cmd in commands.items()), "```", ""]
    path = os.path.join(out, "report.md")
    write_text(path, "\n".join(lines))
    return path

"""`t5kit evaluate`: generate for a labelled set and score it (BLEU, chrF, ROUGE, exact match,
accuracy; metrics.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..data.readers import read_examples
from ..options import option
from .common import TaskFields, predict, resolve_model_dir, say, tokenizer_for
from .metrics import check_metrics, compute


@dataclass
class EvalConfig(TaskFields):
    """Generate for a labelled set and score it."""
    model: str | None = option("HF directory, hub id, or a t5kit run directory", default=None)
    adapter: str | None = option("LoRA adapter folder or hub id (peft's format), merged into the weights at load",
                                 default=None)
    data: str | None = option("labelled file (.jsonl .csv .tsv .parquet, ...), FILE or FILE:PREFIX", default=None)
    metric: list[str] = option("bleu chrf rouge exact_match accuracy", default_factory=lambda: ["bleu", "chrf"])
    predictions: str | None = option("write {input, target, prediction} per example here (JSONL)", default=None)
    output: str | None = option("write the scores here (one JSON object)", default=None)
    tokenizer: str | None = None
    num_beams: int = 1
    max_new_tokens: int = 128
    max_input_length: int = 512
    max_examples: int | None = option("score only the first N examples", default=None)
    batch_size: int = 32
    device: str = "cpu"
    dtype: str = "fp32"


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    """-> {metric: score, ..., "n_examples": n, "truncated_inputs": inputs cut to --max-input-length
    (their first tokens and EOS)[, "sacrebleu_signature": ...]}, also written to cfg.output;
    predictions to cfg.predictions."""
    from ..atomic import write_json, write_text
    from ..inference.cpu import for_inference
    from ..model.hf import from_pretrained, resolve_dtype
    from ..model.t5 import T5

    if not cfg.model or not cfg.data:
        raise ValueError("--model and --data are required")
    check_metrics(cfg.metric)
    source, stats = cfg.source(cfg.data), {}
    examples = read_examples(source, stats)[:cfg.max_examples]
    if stats["skipped"]:
        say(f"{source.path}: skipped {stats['skipped']:,} malformed lines (--skip-bad-lines)")
    if not examples:
        raise ValueError(f"{source.path}: no examples to evaluate")
    model_dir = resolve_model_dir(cfg.model)
    tok = tokenizer_for(model_dir, cfg.tokenizer)
    model = for_inference(from_pretrained(T5, model_dir, dtype=resolve_dtype(cfg.dtype), device=cfg.device,
                                          adapter=cfg.adapter))
    tok.check_model_vocab(model.config.vocab_size, f"{model_dir}/config.json")
    preds, cut = predict(model, tok, [i for i, _ in examples], cfg.batch_size, progress=progress,
                         num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                         max_input_tokens=cfg.max_input_length)
    if cut:
        say(f"{source.path}: truncated {cut:,} inputs to --max-input-length {cfg.max_input_length}")
    scores = compute(cfg.metric, preds, [t for _, t in examples])
    result = {**scores, "n_examples": len(examples), "truncated_inputs": cut}
    if cfg.predictions:
        write_text(cfg.predictions, "".join(json.dumps({"input": i, "target": t, "prediction": p}, ensure_ascii=False)
                                            + "\n" for (i, t), p in zip(examples, preds)))
    if cfg.output:
        write_json(cfg.output, result)
    return result

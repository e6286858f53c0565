"""`t5kit embed`: encode one text per line with a T5 encoder and write the vectors (or hidden
states) as safetensors."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..data.readers import BadLine, utf8_lines
from ..data.tokenizer import pad_rows, truncate_ids
from ..options import option
from .common import resolve_model_dir, say, tokenizer_for

POOLS = ("mean", "none")


@dataclass
class EmbedConfig:
    """Encode one text per line with a T5 encoder; write the vectors (or hidden states) as safetensors."""
    model: str | None = option("encoder-only (T5EncoderModel) or full T5 checkpoint: directory or hub id",
                               default=None)
    input: str | None = option("UTF-8 text file, one text per line (an empty line is an error)", default=None)
    output: str | None = option("safetensors file to write (atomically); rows in input order", default=None)
    pool: str = option("mean: tensor 'embeddings' (N, C), each line's mean over its tokens, padding excluded "
                       "(sentence-transformers' mean pooling). none: 'hidden_states' (N, S_max, C), zero past each "
                       "line's end, and 'attention_mask' (N, S_max), 1 = token", default="mean")
    tokenizer: str | None = option("tokenizer directory (default: the model's)", default=None)
    batch_size: int = 32
    max_length: int = option("longer lines keep their first max_length - 1 tokens and EOS (counted and reported)",
                             default=512)
    device: str = "cpu"
    dtype: str = option("fp32 | bf16 | fp16, also the dtype of the tensors written", default="fp32")


def read_lines(path: str) -> list[str]:
    """The texts of `path`, one per line, line endings removed. A line that is not UTF-8 or is
    empty (or blank) is an error naming the file and line: it would silently embed EOS alone."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: input file not found")
    texts = []
    for n, line in enumerate(utf8_lines(path), 1):
        if isinstance(line, BadLine):
            raise line
        text = line.rstrip("\r\n")
        if not text.strip():
            raise ValueError(f"{path}: line {n} is empty: expected one text per line")
        texts.append(text)
    if not texts:
        raise ValueError(f"{path}: no lines to embed")
    return texts


def embed(cfg: EmbedConfig, progress: bool = True) -> dict:
    """Encode each line of cfg.input with the checkpoint's encoder (T5Encoder: a full checkpoint's
    decoder is never loaded) and write cfg.output. Lines are batched longest first (little
    padding; an out-of-memory shows in the first batch) and written back in input order.
    -> {output, lines, dim, pool, tokens, truncated, seconds, tokens_per_s}."""
    import time

    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from ..atomic import atomic_path
    from ..inference.cpu import for_inference
    from ..model.hf import from_pretrained, resolve_dtype
    from ..model.t5 import T5Encoder, mean_pool

    if not cfg.model or not cfg.input or not cfg.output:
        raise ValueError("--model, --input and --output are required")
    if cfg.pool not in POOLS:
        raise ValueError(f"--pool {cfg.pool!r}: expected one of {', '.join(POOLS)}")
    if cfg.batch_size < 1 or cfg.max_length < 1:
        raise ValueError(f"--batch-size {cfg.batch_size} / --max-length {cfg.max_length}: expected positive integers")
    texts = read_lines(cfg.input)  # before the model loads: a bad line fails in a second
    model_dir = resolve_model_dir(cfg.model)
    tok = tokenizer_for(model_dir, cfg.tokenizer)
    # on CPU, oneDNN-packed weights (for_inference): the same arithmetic, float rounding aside
    model = for_inference(from_pretrained(T5Encoder, model_dir, dtype=resolve_dtype(cfg.dtype), device=cfg.device))
    tok.check_model_vocab(model.config.vocab_size, f"{model_dir}/config.json")
    rows = [tok.encode(t) for t in texts]
    truncated = sum(len(r) > cfg.max_length for r in rows)
    if truncated:
        say(f"{cfg.input}: truncated {truncated:,} of {len(rows):,} lines to --max-length {cfg.max_length} tokens")
    rows = [truncate_ids(r, cfg.max_length, tok.eos_id) for r in rows]
    n, c, width = len(rows), model.config.d_model, max(map(len, rows))
    dtype = model.shared.weight.dtype
    if cfg.pool == "mean":
        out = {"embeddings": torch.zeros(n, c, dtype=dtype)}
    else:
        out = {"hidden_states": torch.zeros(n, width, c, dtype=dtype),
               "attention_mask": torch.zeros(n, width, dtype=torch.long)}
    order = sorted(range(n), key=lambda i: -len(rows[i]))
    bar = tqdm(total=n, disable=not progress, unit="line", desc="embed")
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, n, cfg.batch_size):
            idx = torch.tensor(order[start:start + cfg.batch_size])
            ids, mask = pad_rows([rows[i] for i in idx.tolist()], tok.pad_id)  # (b, s) each
            s = ids.shape[1]
            hidden = model(ids.to(cfg.device), mask.to(cfg.device))  # (b, s, C)
            if cfg.pool == "mean":
                out["embeddings"][idx] = mean_pool(hidden, mask.to(cfg.device)).cpu()
            else:  # padding positions zeroed: the file does not depend on how lines were batched
                out["hidden_states"][idx, :s] = (hidden * mask.to(cfg.device)[:, :, None]).cpu()
                out["attention_mask"][idx, :s] = mask
            bar.update(len(idx))
    seconds = time.perf_counter() - t0
    bar.close()
    with atomic_path(cfg.output) as tmp:
        save_file(out, tmp, metadata={"model": cfg.model, "pool": cfg.pool, "max_length": str(cfg.max_length)})
    tokens = sum(map(len, rows))
    return {"output": cfg.output, "lines": n, "dim": c, "pool": cfg.pool, "tokens": tokens, "truncated": truncated,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}

"""`t5kit` command line: argparse subcommands. The only module that reads argv; imported by nothing."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _err(msg: str) -> None:
    print(f"t5kit: {msg}", file=sys.stderr)


def _read_prompts(path: str) -> tuple[list[str], dict[int, str]]:
    """Lines of a file (or '-' for stdin) decoded one by one, so a bad line names itself and the
    others survive. -> (texts, {index: error})."""
    raw = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    texts, errors = [], {}
    for n, line in enumerate(raw.splitlines()):
        try:
            texts.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            texts.append("")
            errors[n] = f"{path}: line {n + 1} is not UTF-8 (byte offset {e.start} in the line)"
    return texts, errors


def cmd_generate(args) -> int:
    import torch

    from .generate import generate_texts
    from .hf import resolve_dtype
    from .model import T5
    from .tokenizer import Tokenizer

    if not args.prompt and args.input is None:
        _err("give a prompt or --input FILE (or - for stdin)")
        return 2
    if args.prompt and args.input is not None:
        _err("give prompts or --input, not both")
        return 2
    try:
        texts, errors = _read_prompts(args.input) if args.input is not None else (list(args.prompt), {})
    except FileNotFoundError:
        _err(f"{args.input}: input file not found")
        return 2
    if args.seed is not None:
        torch.manual_seed(args.seed)
    try:
        model = T5.from_pretrained(args.model, dtype=resolve_dtype(args.dtype), device=args.device)
        tok = Tokenizer.from_pretrained(args.model)
        tok.check_model_vocab(model.config.vocab_size, f"{args.model}/config.json")
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        _err(str(e))
        return 2
    if args.quantize == "int8":
        from .quantize import quantize_int8
        model = quantize_int8(model)
    kw = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, num_beams=args.num_beams,
              do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              length_penalty=args.length_penalty, early_stopping=args.early_stopping,
              num_return_sequences=args.num_return_sequences, no_repeat_ngram_size=args.no_repeat_ngram_size,
              repetition_penalty=args.repetition_penalty)
    good = [i for i in range(len(texts)) if i not in errors]
    t0 = time.perf_counter()
    try:
        results = generate_texts(model, tok, [texts[i] for i in good], batch_size=args.batch_size,
                                 max_input_tokens=args.max_input_tokens, truncate=not args.no_truncate,
                                 progress=args.input is not None and sys.stderr.isatty() or args.progress,
                                 warn=lambda m: _err("warning: " + m), **kw)
    except ValueError as e:
        _err(str(e))
        return 2
    elapsed = time.perf_counter() - t0
    lines, failed = [], 0
    by_index = dict(zip(good, results))
    for i in range(len(texts)):
        r = by_index.get(i)
        error = errors.get(i) or (r.error and f"{args.input or 'prompt'}: line {i + 1}: {r.error}")
        if error:
            failed += 1
            _err(error)
        if args.json:
            lines.append(json.dumps({"line": i + 1, "input": texts[i], "outputs": [] if error else r.outputs,
                                     **({"error": error} if error else {})}, ensure_ascii=False))
        else:
            lines.extend([""] * args.num_return_sequences if error else r.outputs)
    text = "".join(line + "\n" for line in lines)
    if args.output:
        from .atomic import write_text
        write_text(args.output, text)
    else:
        sys.stdout.write(text)
    new_tokens = sum(r.new_tokens for r in results)
    _err(f"{len(texts) - failed}/{len(texts)} prompts, {new_tokens} new tokens in {elapsed:.2f}s "
         f"({new_tokens / max(elapsed, 1e-9):.1f} tok/s)")
    return 1 if failed else 0


def cmd_tokenizer_train(args) -> int:
    import os

    from .tokenizer import train_tokenizer

    for path in args.input:
        if not os.path.isfile(path):
            _err(f"{path}: input file not found")
            return 2
    tok = train_tokenizer(args.input, args.vocab_size, args.out, extra_ids=args.extra_ids)
    _err(f"wrote {args.out}: {tok.vocab_size} ids ({args.vocab_size} pieces + {args.extra_ids} sentinels)")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from prompts with a T5 checkpoint",
                       description="Generate from prompts (arguments, or one per line of --input). "
                                   "Prints one output per line (JSONL with --json).")
    p.add_argument("prompt", nargs="*", help="prompt texts")
    p.add_argument("--model", required=True, help="checkpoint directory or hub id (config.json + weights + tokenizer)")
    p.add_argument("--input", help="file with one prompt per line, or - for stdin")
    p.add_argument("--output", help="write outputs here (atomically) instead of stdout")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / len**penalty")
    p.add_argument("--early-stopping", type=lambda s: {"true": True, "false": False, "never": "never"}[s.lower()],
                   default=False, help="true | false | never (transformers' meaning)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--no-repeat-ngram-size", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="seed for sampling")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-input-tokens", type=int, default=512, help="longer prompts are truncated (with a warning)")
    p.add_argument("--no-truncate", action="store_true", help="reject prompts longer than --max-input-tokens")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--quantize", choices=["int8"], help="int8 weights for CPU inference")
    p.add_argument("--progress", action="store_true", help="show a progress bar even when stderr is not a terminal")
    p.set_defaults(func=cmd_generate)


def _add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer with T5 ids")
    tsub = p.add_subparsers(dest="tokenizer_cmd", required=True)
    t = tsub.add_parser("train", help="train a unigram SentencePiece model plus sentinels",
                        description="Writes spiece.model, tokenizer.json and tokenizer_config.json into --out.")
    t.add_argument("--input", nargs="+", required=True, help="text files, one sentence per line")
    t.add_argument("--vocab-size", type=int, required=True, help="SentencePiece pieces (sentinels come on top)")
    t.add_argument("--extra-ids", type=int, default=100, help="sentinels <extra_id_N> at the top of the vocabulary")
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_tokenizer_train)


# Megatron-LM pretrain_t5.py flags -> (T5Config / run field, type). Same names, same meaning.
MEGATRON_MODEL = {"encoder_num_layers": "num_layers", "decoder_num_layers": "num_decoder_layers",
                  "hidden_size": "d_model", "num_attention_heads": "num_heads", "kv_channels": "d_kv",
                  "ffn_hidden_size": "d_ff"}
PRETRAIN_DEFAULTS = dict(
    encoder_num_layers=None, decoder_num_layers=None, hidden_size=None, num_attention_heads=None, kv_channels=None,
    ffn_hidden_size=None, seq_length=512, decoder_seq_length=None, max_position_embeddings=None, data_path=None,
    vocab_extra_ids=100, micro_batch_size=8, global_batch_size=None, lr=1e-3, min_lr=0.0, lr_decay_style="cosine",
    lr_warmup_iters=100, train_iters=1000, weight_decay=0.0, clip_grad=1.0, bf16=False, seed=1234, save=None,
    load=None, save_interval=500, eval_interval=100, eval_iters=4, model_preset=None, model=None, tokenizer=None,
    optimizer="adamw", device="cpu", vocab_size=2000, z_loss=0.0, workers=1, skip_bad_lines=False, log_interval=10,
    drop_remainders=False, resume=False)
DEMO = dict(model_preset="tiny", seq_length=128, micro_batch_size=16, train_iters=1500, lr=3e-3, lr_warmup_iters=100,
            eval_interval=100, save_interval=500, save="runs/demo")


def _resolve_pretrain(args) -> dict:
    """defaults < (embedded-corpus demo defaults) < TOML recipe < CLI flags."""
    import tomllib

    recipe = {}
    if args.config:
        try:
            with open(args.config, "rb") as f:
                recipe = {k.replace("-", "_"): v for k, v in tomllib.load(f).items()}
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{args.config}: cannot read TOML recipe ({e})") from None
        unknown = set(recipe) - set(PRETRAIN_DEFAULTS)
        if unknown:
            raise ValueError(f"{args.config}: unknown keys {sorted(unknown)}; expected flags of `t5kit pretrain --help`")
    cli = {k: v for k, v in vars(args).items() if k in PRETRAIN_DEFAULTS and v is not None}
    embedded = "data_path" not in {**recipe, **cli}
    return {**PRETRAIN_DEFAULTS, **(DEMO if embedded else {}), **recipe, **cli, "embedded": embedded}


def cmd_pretrain(args) -> int:
    import os

    import torch

    from . import distributed
    from .config import get_preset
    from .data import (DataConfig, SpanCorruptionBatches, TokenStore, build_token_store, raw_segments,
                       write_embedded_corpus)
    from .model import T5
    from .optim import OptimConfig
    from .spans import random_spans_helper
    from .tokenizer import Tokenizer, train_tokenizer
    from .train import TrainConfig, train, write_run_config

    try:
        r = _resolve_pretrain(args)
        out = r["save"] or "runs/pretrain"
        rank, world, device = distributed.init_from_env(r["device"])
        main_rank = rank == 0
        if r["max_position_embeddings"] is not None and r["max_position_embeddings"] < r["seq_length"]:
            raise ValueError(f"--max-position-embeddings {r['max_position_embeddings']} < --seq-length "
                             f"{r['seq_length']} (T5 uses relative positions; the flag is only checked)")
        # data: an existing token store, text files to tokenize, or the embedded corpus
        paths = [] if r["embedded"] else list(r["data_path"]) if isinstance(r["data_path"], list) else [r["data_path"]]
        store_dir = paths[0] if len(paths) == 1 and os.path.isfile(os.path.join(paths[0], "header.json")) else None
        tok_dir = r["tokenizer"] or (r["model"] if r["model"] else None)
        if r["embedded"]:
            paths = [os.path.join(out, "corpus.txt")]
            if main_rank:
                n_docs = write_embedded_corpus(paths[0])
                _err(f"embedded corpus: {n_docs} chapters (King James + World English Bible) -> {paths[0]}")
        if not tok_dir:  # rank 0 prepares tokenizer and token store; the others wait, then read them
            tok_dir = os.path.join(out, "tokenizer")
            if main_rank:
                _err(f"training a {r['vocab_size']}-piece SentencePiece tokenizer -> {tok_dir}")
                train_tokenizer(paths, r["vocab_size"], tok_dir, extra_ids=r["vocab_extra_ids"])
            distributed.barrier()
        tok = Tokenizer.from_pretrained(tok_dir)
        if store_dir is None:
            store_dir = os.path.join(out, "data")
            if main_rank:
                build_token_store(paths, tok, store_dir, workers=r["workers"], skip_bad_lines=r["skip_bad_lines"])
            distributed.barrier()
        store = TokenStore(store_dir, tok)
        # model
        if r["model"]:
            model = T5.from_pretrained(r["model"])
            cfg = model.config
        else:
            base = get_preset(r["model_preset"] or "t5-v1_1-base")
            shape = {MEGATRON_MODEL[k]: r[k] for k in MEGATRON_MODEL if r[k] is not None}
            if "num_layers" in shape and "num_decoder_layers" not in shape:
                shape["num_decoder_layers"] = shape["num_layers"]
            cfg = base.replace(vocab_size=-(-len(tok) // 128) * 128, dropout_rate=0.0, **shape)
            model = T5(cfg)
            torch.manual_seed(r["seed"])
            model.init_weights()
        tok.check_model_vocab(cfg.vocab_size, "model")
        # the last ~2% of segments (by corpus position) are held out for eval, disjoint from training
        dcfg = DataConfig(inputs_length=r["seq_length"], seed=r["seed"])
        tokens = store.tokens
        segments = raw_segments(store.offsets, random_spans_helper(dcfg.inputs_length)[0])
        n_eval = max(8, len(segments) // 50)
        common = dict(eos=tok.eos_id, pad=tok.pad_id, pack=not r["drop_remainders"], rank=rank, world=world)
        batches = SpanCorruptionBatches(tokens, segments[:-n_eval], dcfg, tok.sentinel_id(0), r["micro_batch_size"], **common)
        eval_batches = SpanCorruptionBatches(tokens, segments[-n_eval:], dcfg, tok.sentinel_id(0),
                                             min(r["micro_batch_size"], 4), **common)
        if r["decoder_seq_length"] is not None and r["decoder_seq_length"] < batches.targets_length:
            raise ValueError(f"--decoder-seq-length {r['decoder_seq_length']} < {batches.targets_length}, the "
                             f"targets length span corruption gives for --seq-length {r['seq_length']}")
        tcfg = TrainConfig(out=out, steps=r["train_iters"], micro_batch=r["micro_batch_size"],
                           global_batch=r["global_batch_size"] or r["micro_batch_size"], clip_grad=r["clip_grad"],
                           z_loss=r["z_loss"], bf16=r["bf16"], eval_interval=r["eval_interval"],
                           eval_iters=r["eval_iters"], save_interval=r["save_interval"], seed=r["seed"],
                           log_interval=r["log_interval"], world_size=world)
        ocfg = OptimConfig(name=r["optimizer"], lr=r["lr"], min_lr=r["min_lr"], schedule=r["lr_decay_style"],
                           warmup_steps=r["lr_warmup_iters"], total_steps=r["train_iters"],
                           weight_decay=r["weight_decay"])
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        _err(str(e))
        return 2
    if main_rank:
        write_run_config(out, model=cfg.to_hf_json(), train=tcfg, optim=ocfg, data=dcfg, flags=r)
        print(json.dumps({"model": cfg.to_hf_json(), "run": r}, indent=1, default=str), file=sys.stderr)
        _err(f"parameters: {cfg.num_params():,}; {world} process(es); raw segment {batches.raw_len} -> inputs "
             f"{dcfg.inputs_length}, targets {batches.targets_length}; {len(batches.segments)} training segments "
             f"({'short ones packed' if batches.pack else 'short ones dropped'}); unigram baseline "
             f"{unigram_entropy(tokens):.3f} nats/token")
    try:
        resume = r["load"] or (os.path.join(out, "checkpoints") if r["resume"] else None)
        row = train(model, batches, eval_batches, tcfg, ocfg, tokenizer=tok, resume=resume, device=device)
    except (FileNotFoundError, ValueError) as e:
        _err(str(e))
        return 2
    finally:
        distributed.shutdown()
    if not main_rank:
        return 0
    _err(f"done: step {row.get('step')}, loss {row.get('loss', float('nan')):.4f}"
         + (f", eval loss {row['eval_loss']:.4f}" if "eval_loss" in row else "") + f"; weights in {out}/final")
    return 0


def unigram_entropy(tokens) -> float:
    """Entropy (nats) of the corpus' token frequencies: the loss of a model that ignores context."""
    import numpy as np
    p = np.bincount(np.asarray(tokens)).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def _add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a T5 with span corruption (Megatron pretrain_t5.py flags)",
                       description="Span-corruption pretraining. With no --data-path it trains on the embedded "
                                   "public-domain corpus (needs the [demo] extra) after training its own tokenizer.")
    p.add_argument("--config", help="TOML recipe; its keys are these flags' names (CLI flags win)")
    for flag, default in PRETRAIN_DEFAULTS.items():
        name = "--" + flag.replace("_", "-")
        if flag == "resume":
            p.add_argument(name, action="store_true", default=None,
                           help="continue from the latest checkpoint in --save (same as --load SAVE/checkpoints)")
        elif isinstance(default, bool):
            p.add_argument(name, action="store_true", default=None)
        elif flag == "data_path":
            p.add_argument(name, nargs="+", default=None, help="token store dir, or .txt / .jsonl / .parquet files")
        else:
            kind = type(default) if default is not None else (
                int if flag in MEGATRON_MODEL or flag.endswith(("length", "embeddings", "size")) else str)
            p.add_argument(name, type=kind, default=None, help=f"default: {default}")
    p.set_defaults(func=cmd_pretrain)


def cmd_preprocess(args) -> int:
    from .data import build_token_store
    from .tokenizer import Tokenizer
    try:
        tok = Tokenizer.from_pretrained(args.tokenizer)
        header = build_token_store(args.input, tok, args.out, workers=args.workers, skip_bad_lines=args.skip_bad_lines)
    except (FileNotFoundError, ValueError) as e:
        _err(str(e))
        return 2
    _err(f"wrote {args.out}: {header['n_tokens']:,} tokens in {header['n_docs']:,} documents"
         + (f" ({header['skipped_lines']} bad lines skipped)" if header["skipped_lines"] else ""))
    return 0


def _add_preprocess(sub) -> None:
    p = sub.add_parser("preprocess", help="tokenize corpora into a memory-mapped token store")
    p.add_argument("--input", nargs="+", required=True, help=".txt (one document per line), .jsonl, .parquet")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or hub id")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--skip-bad-lines", action="store_true", help="skip (and count) lines that are not UTF-8")
    p.set_defaults(func=cmd_preprocess)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t5kit", description="T5-family models: generate, tokenize, pretrain.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_generate(sub)
    _add_tokenizer(sub)
    _add_preprocess(sub)
    _add_pretrain(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)

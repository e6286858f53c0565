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

    from .data.tokenizer import Tokenizer
    from .inference.cpu import for_inference
    from .inference.generate import generate_texts
    from .model.hf import resolve_dtype
    from .model.t5 import T5

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
    try:
        model = T5.from_pretrained(args.model, dtype=resolve_dtype(args.dtype), device=args.device,
                                   adapter=args.adapter)
        tok = Tokenizer.from_pretrained(args.model)
        tok.check_model_vocab(model.config.vocab_size, f"{args.model}/config.json")
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        _err(str(e))
        return 2
    model = for_inference(model, args.quantize)
    if args.seed is not None:  # seeded after loading, so that nothing drawn while loading moves the samples
        torch.manual_seed(args.seed)
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
                                 warn=lambda m: _err("warning: " + m), decode_mode=args.decode_mode, **kw)
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

    from .data.tokenizer import train_tokenizer

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
    p.add_argument("--adapter", help="LoRA adapter folder or hub id (peft's format), merged into the weights at load")
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
    p.add_argument("--decode-mode", default="auto", choices=["auto", "eager", "graph", "compile"],
                   help="the per-token step: auto = CUDA graphs on CUDA, eager on CPU; compile = torch.compile "
                        "(on CPU the fastest step, after a 10-25 s compile per batch / length bucket)")
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


def _flag_kind(annotation: str):
    """(argparse type, nargs) from a config field's annotation string."""
    base = annotation.replace(" | None", "")
    if base.startswith("list["):
        return {"str": str, "int": int}[base[5:-1]], "+"
    return {"int": int, "float": float, "str": str, "bool": bool}[base], None


def _add_job(sub, name: str, cls, job, help: str, description: str) -> None:
    """A subcommand whose flags are the fields of a job's config dataclass (dashes for
    underscores); unset flags stay None so options.resolve can layer defaults < recipe < flags."""
    from dataclasses import MISSING, fields
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("--config", help="TOML recipe; its keys are these flags' names (flags win)")
    for f in fields(cls):
        kind, nargs = _flag_kind(f.type)
        default = f.default if f.default is not MISSING else f.default_factory()
        shown = default is not None and default is not False and default != []
        text = " ".join(filter(None, (f.metadata.get("help", ""), f"(default: {default})" if shown else "")))
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action="store_true", default=None, help=text)
        elif nargs:
            p.add_argument(flag, type=kind, nargs=nargs, action="extend", default=None, help=text)
        else:
            p.add_argument(flag, type=kind, default=None, help=text)
    p.set_defaults(func=lambda args: _run_job(cls, job, args))


def _run_job(cls, job, args) -> int:
    from dataclasses import fields

    from .options import resolve
    from .training import parallel
    values = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name) is not None}
    try:
        result = job(resolve(cls, args.config, values))
        main = parallel.is_main()
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        _err(str(e))  # on every rank: each one checked the same input (parallel.init says why)
        return 2
    finally:
        parallel.shutdown()
    if main and result is not None:  # None: the job printed its own output (pretrain --show-examples)
        print(json.dumps(result, indent=1, default=str))
    return 0


def _add_jobs(sub) -> None:
    from . import (
        DemoConfig,
        EmbedConfig,
        EvalConfig,
        FinetuneConfig,
        PretrainConfig,
        ServeConfig,
        demo,
        embed,
        evaluate,
        finetune,
        pretrain,
        serve,
    )
    _add_job(sub, "pretrain", PretrainConfig, pretrain,
             "pretrain a T5 with span corruption, UL2 or a prefix LM (Megatron pretrain_t5.py flags)",
             "Pretraining by span corruption (default), UL2's mixture of denoisers or a prefix LM (--objective); "
             "--show-examples N prints N examples of the data as JSON lines instead of training. With no --data-path it trains on the embedded public-domain corpus "
             "(needs the [demo] extra) after training its own tokenizer.")
    _add_job(sub, "finetune", FinetuneConfig, finetune, "fine-tune a T5 on text-to-text tasks",
             "Fine-tune on one task or a mixture (--train FILE[:PREFIX] ...), validating by loss or a "
             "generation metric; writes <save>/best and <save>/final in the HF layout with the tokenizer.")
    _add_job(sub, "evaluate", EvalConfig, evaluate, "generate for a labelled set and score it",
             "Batched, length-sorted generation, then BLEU / chrF (sacrebleu), ROUGE (rouge-score), exact "
             "match and accuracy (T5's answer normalisation). Prints the scores as JSON.")
    _add_job(sub, "embed", EmbedConfig, embed, "encode one text per line with a T5 encoder",
             "Runs the encoder of an encoder-only (T5EncoderModel) or full T5 checkpoint over each line of --input "
             "(length-sorted batches, a progress bar) and writes --output, a safetensors file with rows in input "
             "order: 'embeddings' (N, C) with --pool mean, or 'hidden_states' (N, S_max, C) plus 'attention_mask' "
             "(N, S_max) with --pool none. Prints a summary as JSON.")
    _add_job(sub, "serve", ServeConfig, serve, "serve generation and embeddings over HTTP",
             "An HTTP server (FastAPI + uvicorn, the [serve] extra) with continuous batching: POST /v1/generate "
             "(JSON or Server-Sent Events), POST /v1/embed, GET /health, GET /metrics (Prometheus), /docs. "
             "SIGTERM stops admission, finishes the requests in flight and exits 0.")
    from .jobs.export import ExportConfig, export
    _add_job(sub, "export", ExportConfig, export, "merge a LoRA adapter into its base model",
             "Writes --out, a plain HF checkpoint (safetensors, config.json, tokenizer) of --model with --adapter "
             "merged in, streamed tensor by tensor; transformers and CTranslate2 load it.")
    _add_job(sub, "demo", DemoConfig, demo, "the end-to-end English -> French demo",
             "Builds an English -> French Bible corpus split by whole books, trains a tokenizer, pretrains "
             "with span corruption, fine-tunes, evaluates BLEU / chrF on held-out books and writes "
             "<save>/report.md, all within --minutes.")


def cmd_preprocess(args) -> int:
    from .data.store import build_token_store
    from .jobs.common import tokenizer_for
    megatron = args.tokenizer_type or args.tokenizer_model or args.vocab_file
    if bool(args.tokenizer) == bool(megatron):
        _err("give --tokenizer DIR, or Megatron's --tokenizer-type with --vocab-file / --tokenizer-model")
        return 2
    try:
        tok = tokenizer_for(None, args.tokenizer, args.tokenizer_type, args.tokenizer_model, args.vocab_file,
                            args.vocab_extra_ids)  # the one choice of tokenizer, as `t5kit pretrain` makes it
        header = build_token_store(args.input, tok, args.out, workers=args.workers, skip_bad_lines=args.skip_bad_lines,
                                   text_field=args.text_field, fmt=args.format)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        _err(str(e))
        return 2
    written = f"{args.out}.bin / .idx" if args.format == "megatron" else args.out
    _err(f"wrote {written}: {header['n_tokens']:,} tokens in {header['n_docs']:,} documents"
         + (f" ({header['skipped_lines']} bad lines skipped)" if header["skipped_lines"] else ""))
    return 0


def _add_preprocess(sub) -> None:
    p = sub.add_parser("preprocess", help="tokenize corpora into a memory-mapped token store",
                       description="Tokenizes corpora once into a t5kit token store folder, or with --format megatron "
                                   "into Megatron-LM's OUT.bin / OUT.idx, which `t5kit pretrain --data-path` and "
                                   "Megatron-LM both read.")
    p.add_argument("--input", nargs="+", required=True,
                   help="files, directories or glob patterns (quoted or not): .txt (one document per line), .jsonl / "
                        ".json (JSON lines), each also .gz / .zst, and .parquet")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column holding the text (default: text)")
    p.add_argument("--format", default="t5kit", choices=["t5kit", "megatron"],
                   help="t5kit: a store folder OUT; megatron: OUT.bin + OUT.idx (MMIDIDX) (default: t5kit)")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id (or Megatron's flags below)")
    from .jobs.pretrain import PretrainConfig
    for name in ("tokenizer_type", "tokenizer_model", "vocab_file", "vocab_extra_ids"):  # as `t5kit pretrain` has them
        f = PretrainConfig.__dataclass_fields__[name]
        p.add_argument("--" + name.replace("_", "-"), type=type(f.default) if f.default is not None else str,
                       default=f.default, help=f.metadata["help"])
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) bad lines: not UTF-8, not a JSON object, text null or not a string")
    p.set_defaults(func=cmd_preprocess)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t5kit", description="T5-family models: generate, tokenize, pretrain, fine-tune, evaluate, embed.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_generate(sub)
    _add_tokenizer(sub)
    _add_preprocess(sub)
    _add_jobs(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)

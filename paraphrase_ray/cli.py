"""`paraphrase-ray` command line: a thin map from commands to library functions.

Each pipeline stage that owns a command exposes ``add_cli(subparsers)``; heavy imports (torch, Ray) happen
inside the command so ``--help`` is instant. User errors (bad config, data, model, prompt files) print one
clear line and exit 2; no stack trace.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ConfigError, RunConfig, from_dict, load_yaml, replace_nested

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, FileNotFoundError)


def _user_errors() -> tuple[type[Exception], ...]:
    from .data import DataError
    from .models import ModelLoadError
    from .prompt import PromptFileError

    return (*USER_ERRORS, DataError, ModelLoadError, PromptFileError, ValueError)


def build_run_config(args: argparse.Namespace) -> RunConfig:
    """YAML (``--config``) first, then explicit flags on top."""
    cfg = from_dict(RunConfig, load_yaml(args.config)) if getattr(args, "config", None) else RunConfig()
    overrides = {
        "model": args.model,
        "prompt.n_tokens": args.n_tokens,
        "prompt.init": args.init,
        "prompt.init_text": args.init_text,
        "train.lr": args.lr,
        "train.steps": args.steps,
        "train.batch_size": args.batch_size,
        "train.device": args.device,
        "train.precision": args.precision,
        "train.eval_every": args.eval_every,
        "train.seed": args.seed,
        "data.sources": tuple(args.data) if args.data else None,
    }
    return replace_nested(cfg, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from .models import load_model
    from .train import train

    cfg = build_run_config(args)
    loaded = load_model(cfg.model, cfg.train.precision, cfg.train.device)
    out = Path(args.out)
    resume = out / "checkpoint" if args.resume else None
    result = train(loaded, cfg, out_dir=out, resume_from=resume)
    print(json.dumps(result.metrics()))
    if result.status == "nan":
        print("error: training diverged (NaN/inf loss); nothing was saved. Try a lower --lr.", file=sys.stderr)
        return 1
    return 0


def _load_for_prompt(prompt_dir: str, model: str | None, device: str):
    """Load the prompt's base model (or ``model``) and the prompt, checking they fit together."""
    from .models import load_model
    from .prompt import load_bundle, read_meta

    meta = read_meta(prompt_dir)
    name = model or meta.get("base_model")
    if not name:
        raise ConfigError(f"{prompt_dir} does not record its base model; pass --model")
    precision = (meta.get("train_config") or {}).get("precision", "auto")
    loaded = load_model(name, precision, device)
    bundle = load_bundle(prompt_dir, expected_dim=loaded.embed_dim)
    bundle.prompt.to(loaded.device)
    return loaded, bundle


def generation_from_meta(meta: dict, **overrides):
    """Template and generation config recorded at training time, with CLI overrides applied."""
    import dataclasses

    from .config import GenerationConfig, TemplateConfig

    template = from_dict(TemplateConfig, meta.get("template") or {})
    gen = from_dict(GenerationConfig, meta.get("generation") or {})
    gen = dataclasses.replace(gen, **{k: v for k, v in overrides.items() if v is not None})
    return template, gen


def cmd_paraphrase(args: argparse.Namespace) -> int:
    from .data import read_source_file
    from .generate import paraphrase

    if (args.text is None) == (args.input is None):
        raise ConfigError("give exactly one of --text or --input")
    if args.input and not args.output:
        raise ConfigError("--input needs --output FILE.jsonl")
    loaded, bundle = _load_for_prompt(args.prompt, args.model, args.device)
    k = args.num_candidates
    template, gen = generation_from_meta(
        bundle.meta, max_new_tokens=args.max_new_tokens, num_return_sequences=k,
        do_sample=True if k > 1 else None, temperature=0.8 if k > 1 else None, top_p=0.95 if k > 1 else None,
    )
    max_src = int(bundle.meta.get("max_source_tokens", 64))
    rows = [{"source": args.text}] if args.text is not None else read_source_file(args.input)
    if args.text is not None and not args.text.strip():
        raise ConfigError("--text is empty")
    cands = paraphrase(
        loaded, [r["source"] for r in rows], bundle.prompt, template, gen, args.batch_size, max_src,
        progress=args.input is not None and sys.stderr.isatty(),
    )
    if args.text is not None:
        for c in cands[0]:
            print(c)
        return 0
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row, c in zip(rows, cands):
            rec = {**row, "prediction": c[0]}
            if k > 1:
                rec["candidates"] = c
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.replace(out)  # never leave a half-written output file
    print(f"wrote {len(rows)} paraphrases to {out}", file=sys.stderr)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .config import DataConfig
    from .data import load_pairs

    cfg = DataConfig(sources=tuple(args.data), val_fraction=args.val_fraction, seed=args.seed)
    train, val, report = load_pairs(cfg)
    print(report.summary())
    print(f"{len(train)} train / {len(val)} validation pairs")
    for p in train[: args.show]:
        print(f"  {p.source}\n    -> {p.target}")
    return 0


def _add_common_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="hub id (facebook/opt-125m), local model dir, or 'smollm2-135m' (default, offline)")
    p.add_argument("--data", nargs="+", help="data sources: file.jsonl|csv|tsv|parquet, hf:glue/mrpc, or 'sample' (default)")
    p.add_argument("--n-tokens", type=int, help="soft prompt length (default 20)")
    p.add_argument("--init", choices=["vocab", "random", "random_std", "text"], help="prompt init strategy (default vocab)")
    p.add_argument("--init-text", help="text whose embeddings initialise the prompt when --init text")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 0.03)")
    p.add_argument("--steps", type=int, help="training steps (default 200)")
    p.add_argument("--batch-size", type=int, help="pairs per step (default 8)")
    p.add_argument("--eval-every", type=int, help="steps between validation-loss evaluations (default 50)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default auto)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="frozen-weight dtype (default auto: bf16 where fast)")
    p.add_argument("--seed", type=int, help="seed for init, data order and split")
    p.add_argument("--config", help="YAML file with model/prompt/template/data/train/generation sections; flags override it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paraphrase-ray",
        description="Tune soft prompts that make a small frozen causal LM paraphrase; sweep them with Ray Tune; "
        "serve them with Ray Serve. Every command runs offline on the embedded smollm2-135m by default.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one soft prompt", description="Train one soft prompt on a frozen causal LM.")
    _add_common_train_flags(p)
    p.add_argument("--out", required=True, help="prompt directory to write (PEFT-compatible)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if present")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("paraphrase", help="paraphrase text with a trained prompt", description="Paraphrase a sentence or a file with a trained prompt.")
    p.add_argument("--prompt", required=True, help="prompt directory written by train or tune")
    p.add_argument("--text", help="one sentence to paraphrase")
    p.add_argument("--input", help="JSONL/CSV/TSV file with a 'source' column (other columns are carried through)")
    p.add_argument("--output", help="JSONL file to write (adds 'prediction', and 'candidates' when K > 1)")
    p.add_argument("--num-candidates", type=int, default=1, help="candidates per input (K > 1 samples with temperature 0.8)")
    p.add_argument("--max-new-tokens", type=int, help="cap on generated tokens (default: the prompt's, 64)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per generation batch")
    p.add_argument("--model", help="override the prompt's recorded base model")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default auto)")
    p.set_defaults(func=cmd_paraphrase)

    p = sub.add_parser("data", help="inspect a data source", description="Load, clean and split data; print counts and examples.")
    p.add_argument("data", nargs="+", help="data sources (see train --data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--show", type=int, default=3, help="example pairs to print")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser(
        "evaluate", help="score prompts (or the zero-shot baseline) on held-out pairs",
        description="Generate paraphrases for held-out pairs and print copy-aware metrics.",
    )
    p.add_argument("--prompt", help="prompt directory to evaluate")
    p.add_argument("--compare", nargs="+", metavar="DIR", help="several prompt directories side by side")
    p.add_argument("--zero-shot", action="store_true", help="also (or only) score the hard-prompt baseline")
    p.add_argument("--model", help="base model (default: the prompt's; smollm2-135m for --zero-shot alone)")
    p.add_argument("--data", nargs="+", required=True, help="data sources (see train --data)")
    p.add_argument("--split", choices=["validation", "all"], default="validation",
                   help="validation: the held-out split of the data (same seed as training); all: every row")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share when --split validation")
    p.add_argument("--seed", type=int, default=0, help="split seed (must match training)")
    p.add_argument("--limit", type=int, help="score at most N rows")
    p.add_argument("--examples", type=int, default=3, help="example rows to print")
    p.add_argument("--batch-size", type=int, default=16, help="rows per generation batch")
    p.add_argument("--embedder", default="sentence-transformers/all-MiniLM-L6-v2", help="sentence-transformers model")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    p.add_argument("--output", help="write the full report (summary + rows) as JSON")
    p.set_defaults(func=_lazy("report", "cmd_evaluate"))

    p = sub.add_parser(
        "tune", help="sweep soft prompts with Ray Tune",
        description="Run a Ray Tune sweep over prompt length, init and learning rate; export the best prompt.",
    )
    p.add_argument("--space", required=True, help="search space YAML (see search_spaces/)")
    p.add_argument("--name", help="sweep name (default: the space file's name)")
    p.add_argument("--storage", default="runs/sweeps", help="results root: a local path or gs://BUCKET/PREFIX")
    p.add_argument("--num-samples", type=int, help="override the space's num_samples")
    p.add_argument("--smoke-test", action="store_true", help="2 trials x a few steps, to check wiring")
    p.add_argument("--resume", action="store_true", help="resume an interrupted sweep of the same name")
    p.add_argument("--address", help="Ray cluster address ('auto' for the cluster this runs on); default: local Ray")
    p.set_defaults(func=_lazy("tune", "cmd_tune"))

    p = sub.add_parser(
        "serve", help="serve prompts over HTTP with Ray Serve",
        description="Serve one base model with many soft prompts behind an HTTP endpoint (Ctrl-C stops).",
    )
    p.add_argument("--prompt", action="append", required=True, metavar="[NAME=]DIR",
                   help="prompt directory, optionally named; repeat for several (the first is the default)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set PARAPHRASE_RAY_API_KEY)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the replica runs")
    p.add_argument("--address", help="Ray cluster address; default: start a local Ray")
    p.set_defaults(func=_lazy("serving", "cmd_serve"))

    p = sub.add_parser(
        "explain", help="nearest vocabulary tokens of each prompt vector",
        description="For each prompt position, the nearest vocabulary tokens in the input-embedding space.",
    )
    p.add_argument("--prompt", required=True, help="prompt directory")
    p.add_argument("--top-k", type=int, default=5, help="tokens per position")
    p.add_argument("--metric", choices=["cosine", "l2"], default="cosine", help="distance")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--model", help="override the prompt's recorded base model")
    p.set_defaults(func=_lazy("explain", "cmd_explain"))
    return parser


def _lazy(module: str, func: str):
    """Import a stage only when its command runs (Ray and torch imports cost seconds)."""

    def run(args: argparse.Namespace) -> int:
        mod = __import__(f"paraphrase_ray.{module}", fromlist=[func])
        return getattr(mod, func)(args)

    return run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`paraphrase-ray` command line: a thin map from commands to library functions.

Each pipeline stage that owns a command exposes ``add_cli(subparsers)``; heavy imports (torch, Ray) happen
inside the command so ``--help`` is instant. User errors (bad config, data, model, prompt files) print one
clear line and exit 2; no stack trace.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from paraphrase_ray.config import (
    DEFAULT_CANDIDATES,
    INIT_STRATEGIES,
    PRECISIONS,
    PromptConfig,
    RunConfig,
    TrainConfig,
    from_dict,
    load_yaml,
    replace_nested,
)
from paraphrase_ray.errors import ConfigError
from paraphrase_ray.evaluation.embedder import DEFAULT_EMBEDDER

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, FileNotFoundError)
DEVICES = ("auto", "cpu", "cuda")
_QUANTIZE = {"auto": "auto", "fp32": "none", "int8": "int8"}  # paraphrase --precision -> generation.quantize


def _user_errors() -> tuple[type[Exception], ...]:
    from paraphrase_ray.errors import DataError, ModelLoadError, PromptFileError

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
    from paraphrase_ray.models import load_model
    from paraphrase_ray.training.trainer import train

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


def cmd_paraphrase(args: argparse.Namespace) -> int:
    from paraphrase_ray.api import decoding_for, job_summary, paraphrase_job
    from paraphrase_ray.data import read_source_file
    from paraphrase_ray.files import write_records
    from paraphrase_ray.prompt.soft_prompt import PromptMeta
    from paraphrase_ray.storage import resolve_prompt_dir

    if (args.text is None) == (args.input is None):
        raise ConfigError("give exactly one of --text or --input")
    if args.input and not args.output:
        raise ConfigError("--input needs --output FILE.jsonl|FILE.parquet")
    if args.text is not None and not args.text.strip():
        raise ConfigError("--text is empty")
    if args.ray and args.input is None:
        raise ConfigError("--ray paraphrases files: give --input and --output")
    shown = args.num_candidates  # asked for explicitly: every candidate is printed / written
    k, quantize = shown or DEFAULT_CANDIDATES, _QUANTIZE[args.precision]
    args.prompt = str(resolve_prompt_dir(args.prompt))  # a gs:// prompt (a sweep's best/) is fetched once
    if args.ray:  # Ray Data: a pool of actors, each loading the model once; input/output local or gs://
        from paraphrase_ray.serve.batch import paraphrase_dataset

        gen = decoding_for(PromptMeta.read(args.prompt), k, max_new_tokens=args.max_new_tokens, quantize=quantize)
        out = paraphrase_dataset(
            args.prompt, args.input, args.output, gen, model=args.model, device=args.device,
            batch_size=args.batch_size, concurrency=args.concurrency, num_gpus=args.num_gpus,
            num_cpus=args.num_cpus, embedder=args.embedder, address=args.address,
        )
        print(f"wrote paraphrases to {out}/", file=sys.stderr)
        return 0
    rows = [{"source": args.text}] if args.text is not None else read_source_file(args.input)
    cands, stats = paraphrase_job(
        args.prompt, [r["source"] for r in rows], k, model=args.model, device=args.device,
        batch_size=args.batch_size, embedder=args.embedder, max_new_tokens=args.max_new_tokens, quantize=quantize,
        progress=args.input is not None and sys.stderr.isatty(),
    )  # best candidate first when K > 1: usable, then faithful, then by objective (metrics.rank_candidates)
    if args.stats:
        from paraphrase_ray.files import write_json

        write_json(args.stats, stats)
    if args.text is not None:
        for c in cands[0] if shown else cands[0][:1]:
            print(c)
        return 0
    records = [{**row, "prediction": c[0], **({"candidates": c} if shown and k > 1 else {})} for row, c in zip(rows, cands)]
    print(job_summary(stats, write_records(args.output, records)), file=sys.stderr)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from paraphrase_ray.prompt.card import push_prompt

    url = push_prompt(args.prompt, args.repo_id, private=args.private)
    print(f"pushed {args.prompt} to {url}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from paraphrase_ray.config import DataConfig
    from paraphrase_ray.data import load_pairs

    cfg = DataConfig(sources=tuple(args.data), val_fraction=args.val_fraction, seed=args.seed)
    train, val, report = load_pairs(cfg)
    print(report.summary())
    print(f"{len(train)} train / {len(val)} validation pairs")
    for p in train[: args.show]:
        print(f"  {p.source}\n    -> {p.target}")
    return 0


def _add_common_train_flags(p: argparse.ArgumentParser) -> None:
    run, pc, tc = RunConfig(), PromptConfig(), TrainConfig()
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help=f"hub id (facebook/opt-125m), local model dir, or {run.model!r} (default, offline)")
    g.add_argument("--data", nargs="+", help="data sources: file.jsonl|csv|tsv|parquet, hf:glue/mrpc, or 'sample' "
                   f"(default {' '.join(run.data.sources)})")
    g = p.add_argument_group("the prompt")
    g.add_argument("--n-tokens", type=int, help=f"soft prompt length (default {pc.n_tokens})")
    g.add_argument("--init", choices=INIT_STRATEGIES, help=f"prompt init strategy (default {pc.init})")
    g.add_argument("--init-text", help="text whose embeddings initialise the prompt when --init text")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, help=f"AdamW learning rate (default {tc.lr})")
    g.add_argument("--steps", type=int, help=f"training steps (default {tc.steps})")
    g.add_argument("--batch-size", type=int, help=f"pairs per step (default {tc.batch_size})")
    g.add_argument("--eval-every", type=int, help=f"steps between validation-loss evaluations (default {tc.eval_every})")
    g.add_argument("--seed", type=int, help="seed for init, data order and split")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", choices=DEVICES, help=f"where to train (default {tc.device})")
    g.add_argument("--precision", choices=PRECISIONS, help=f"frozen-weight dtype (default {tc.precision}: bf16 where fast)")
    p.add_argument("--config", help="YAML file with model/prompt/template/data/train/generation sections; flags override it")


def _add_device_flag(p, what: str) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES, help=f"{what} (default auto)")


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
    p.add_argument("--prompt", required=True, help="prompt directory written by train or tune, or saved by PEFT; local or gs://")
    p.add_argument("--model", help="override the prompt's recorded base model (needed when a PEFT prompt records none)")
    g = p.add_argument_group("what to paraphrase")
    g.add_argument("--text", help="one sentence to paraphrase")
    g.add_argument("--input", help="JSONL/CSV/TSV/Parquet file with a 'source' column (other columns are carried "
                   "through); with --ray also a directory of Parquet files or gs://")
    g.add_argument("--output", help="JSONL or .parquet file to write (adds 'prediction', and 'candidates' when K > 1); "
                   "with --ray a directory of Parquet files (JSONL files if it ends in .jsonl), local or gs://")
    g = p.add_argument_group("decoding")
    g.add_argument("--num-candidates", type=int, default=None,
                   help=f"sample K candidates (temperature 0.8) and keep the best: usable, faithful, then by objective "
                   f"(default {DEFAULT_CANDIDATES}; 1 = greedy, ~12x faster, fewer faithful rows). Given explicitly, "
                   "--text prints all K, best first, and --output adds them as 'candidates'")
    g.add_argument("--embedder", default=DEFAULT_EMBEDDER, help="sentence-transformers model that ranks candidates")
    g.add_argument("--max-new-tokens", type=int, help="cap on generated tokens (default: the prompt's, 64)")
    g.add_argument("--batch-size", type=int, default=16, help="rows per generation batch")
    g.add_argument("--precision", choices=sorted(_QUANTIZE), default="auto",
                   help="CPU weights when generating: auto (the exact Q4_1 kernel where the weights allow it), "
                   "fp32 (the plain exact path), int8 (fbgemm, approximate)")
    g.add_argument("--stats", metavar="FILE.json", help="write rows, new_tokens, generate_s, load_s and path as JSON")
    _add_device_flag(g, "where to run")
    g = p.add_argument_group("at scale (Ray Data)")
    g.add_argument("--ray", action="store_true", help="run through Ray Data: a pool of actors, each loading the model once")
    g.add_argument("--concurrency", type=int, default=1, help="actors in the pool (default 1)")
    g.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor; a share packs several on one card")
    g.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per actor (its torch threads)")
    g.add_argument("--address", help="Ray cluster address ('auto' for the cluster this runs on); default: local Ray")
    p.set_defaults(func=cmd_paraphrase)

    p = sub.add_parser(
        "push", help="upload a prompt directory to the Hugging Face Hub",
        description="Upload a prompt directory (weights, configs, model card) to a Hub model repo; needs a token "
        "(`hf auth login` or HF_TOKEN).",
    )
    p.add_argument("--prompt", required=True, help="prompt directory (train --out, or a sweep's best/)")
    p.add_argument("--repo-id", required=True, help="USER/NAME or ORG/NAME; created if it does not exist")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.set_defaults(func=cmd_push)

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
    g = p.add_argument_group("systems to score")
    g.add_argument("--prompt", help="prompt directory to evaluate")
    g.add_argument("--compare", nargs="+", metavar="DIR", help="several prompt directories side by side")
    g.add_argument("--zero-shot", action="store_true", help="also (or only) score the hard-prompt baseline")
    g.add_argument("--model", help="base model (default: the prompt's; smollm2-135m for --zero-shot alone)")
    g = p.add_argument_group("rows to score on")
    g.add_argument("--data", nargs="+", required=True, help="data sources (see train --data)")
    g.add_argument("--split", choices=["validation", "all"], default="validation",
                   help="validation: the held-out split of the data (same seed as training); all: every row")
    g.add_argument("--val-fraction", type=float, default=0.1, help="validation share when --split validation")
    g.add_argument("--seed", type=int, default=0, help="split seed (must match training)")
    g.add_argument("--limit", type=int, help="score at most N rows")
    g = p.add_argument_group("how to run and report")
    g.add_argument("--batch-size", type=int, default=16, help="rows per generation batch")
    g.add_argument("--embedder", default=DEFAULT_EMBEDDER, help="sentence-transformers model")
    g.add_argument("--num-candidates", type=int, default=DEFAULT_CANDIDATES,
                   help=f"sample K candidates per row and score the best, as paraphrase does (default "
                   f"{DEFAULT_CANDIDATES}; 1 = greedy)")
    _add_device_flag(g, "where to run")
    g.add_argument("--examples", type=int, default=3, help="example rows to print")
    g.add_argument("--output", help="write the full report (summary + rows) as JSON")
    p.set_defaults(func=_lazy("evaluation.report", "cmd_evaluate"))

    p = sub.add_parser(
        "tune", help="sweep soft prompts with Ray Tune",
        description="Run a Ray Tune sweep over prompt length, init and learning rate; export the best prompt.",
    )
    g = p.add_argument_group("what to search")
    g.add_argument("--space", required=True, help="search space YAML (see search_spaces/)")
    g.add_argument("--num-samples", type=int, help="override the space's num_samples")
    g.add_argument("--smoke-test", action="store_true", help="2 trials x a few steps, to check wiring")
    g = p.add_argument_group("where results go")
    g.add_argument("--name", help="sweep name (default: the space file's name)")
    g.add_argument("--storage", default="runs/sweeps", help="results root: a local path or gs://BUCKET/PREFIX")
    g.add_argument("--resume", action="store_true", help="resume an interrupted sweep of the same name")
    g = p.add_argument_group("tracking (Tune's TensorBoard files are always written: tensorboard --logdir STORAGE/NAME)")
    g.add_argument("--mlflow", action="store_true",
                   help="one MLflow run per trial (params + every reported metric) in STORAGE/NAME/mlflow.db")
    g.add_argument("--mlflow-uri", metavar="URI", help="MLflow tracking URI (implies --mlflow): http://HOST:5000, sqlite:///PATH")
    g.add_argument("--wandb", action="store_true", help="one W&B run per trial, offline unless tracking.wandb_mode says online")
    p.add_argument("--address", help="Ray cluster address ('auto' for the cluster this runs on); default: local Ray")
    p.set_defaults(func=_lazy("sweep.driver", "cmd_tune"))

    p = sub.add_parser(
        "serve", help="serve prompts over HTTP with Ray Serve",
        description="Serve one base model with many soft prompts behind an HTTP endpoint (Ctrl-C stops).",
    )
    p.add_argument("--prompt", action="append", required=True, metavar="[NAME=]DIR",
                   help="prompt directory, optionally named; repeat for several (the first is the default)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set PARAPHRASE_RAY_API_KEY)")
    _add_device_flag(p, "where the replica runs")
    p.add_argument("--address", help="Ray cluster address; default: start a local Ray")
    g = p.add_argument_group("back-pressure (also args in serve/config.yaml)")
    g.add_argument("--max-queued-rows", type=int, default=256, metavar="N",
                   help="texts waiting per replica; beyond them a request gets 503 with Retry-After (default 256)")
    g.add_argument("--request-timeout-s", type=float, default=60.0, metavar="S",
                   help="a request not answered within S seconds gets 504 (default 60)")
    p.set_defaults(func=_lazy("serve.runner", "cmd_serve"))

    p = sub.add_parser(
        "explain", help="nearest vocabulary tokens of each prompt vector",
        description="For each prompt position, the nearest vocabulary tokens in the input-embedding space.",
    )
    p.add_argument("--prompt", required=True, help="prompt directory")
    p.add_argument("--top-k", type=int, default=5, help="tokens per position")
    p.add_argument("--metric", choices=["cosine", "l2"], default="cosine", help="distance")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--model", help="override the prompt's recorded base model")
    p.set_defaults(func=_lazy("prompt.explain", "cmd_explain"))
    return parser


def _lazy(module: str, func: str):
    """Import a stage only when its command runs (Ray and torch imports cost seconds)."""

    def run(args: argparse.Namespace) -> int:
        mod = __import__(f"paraphrase_ray.{module}", fromlist=[func])
        return getattr(mod, func)(args)

    return run


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test capture swaps it between calls)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """The library logs to "paraphrase_ray"; the command line shows those lines on stderr as plain text."""
    logger = logging.getLogger("paraphrase_ray")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
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

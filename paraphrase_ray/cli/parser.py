"""The ``paraphrase-ray`` argument parser: every command, its flags and their help, and nothing that runs.

Built without importing torch or Ray, so ``paraphrase-ray --help`` is instant. ``cli.main.COMMANDS`` maps each
command name to the function in ``cli.commands`` that runs it.
"""

from __future__ import annotations

import argparse

from paraphrase_ray.config import (
    DEFAULT_CANDIDATES,
    INIT_STRATEGIES,
    PRECISIONS,
    PromptConfig,
    RunConfig,
    TrainConfig,
)
from paraphrase_ray.evaluation.embedder import DEFAULT_EMBEDDER

DEVICES = ("auto", "cpu", "cuda")
QUANTIZE = {"auto": "auto", "fp32": "none", "int8": "int8"}  # paraphrase --precision -> generation.quantize


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
    g.add_argument("--precision", choices=PRECISIONS,
                   help=f"frozen weights' training dtype (default {tc.precision}: bf16 where a GEMM probe measures it "
                        ">= 1.5x fp32, else fp32; generation stays on the exact fp32 weights)")
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

    p = sub.add_parser("paraphrase", help="paraphrase text with a trained prompt", description="Paraphrase a sentence or a file with a trained prompt.")
    p.add_argument("--prompt", required=True, help="prompt directory written by train or tune, or saved by PEFT; local or gs://")
    p.add_argument("--model", help="override the prompt's recorded base model (needed when a PEFT prompt records none)")
    g = p.add_argument_group("what to paraphrase")
    g.add_argument("--text", help="one sentence to paraphrase")
    g.add_argument("--input", help="JSONL/CSV/TSV/Parquet file with a 'source' column (other columns are carried "
                   "through); with --ray also a directory of Parquet files or gs://")
    g.add_argument("--output", help="JSONL or .parquet file to write (adds 'prediction', and 'candidates' when K > 1); "
                   "with --ray a directory of Parquet files (JSONL files if it ends in .jsonl), local or gs://")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an --output that exists and is not empty (default: refuse); never one that holds "
                   "the --input")
    g = p.add_argument_group("decoding")
    g.add_argument("--num-candidates", type=int, default=None,
                   help=f"sample K candidates (temperature 0.8) and keep the best: usable, faithful, acceptable, then by objective "
                   f"(default {DEFAULT_CANDIDATES}; 1 = greedy, ~12x faster, fewer faithful rows). Given explicitly, "
                   "--text prints all K, best first, and --output adds them as 'candidates'")
    g.add_argument("--only-accepted", action="store_true",
                   help="keep only paraphrases the reader's-verdict detector accepts (meaning kept: nothing that "
                   "matters added or dropped, no broken word, names and numbers kept, reworded); the summary line "
                   "gives the accepted share. Every output row carries the detector's flags either way")
    g.add_argument("--embedder", default=DEFAULT_EMBEDDER, help="sentence-transformers model that ranks candidates")
    g.add_argument("--max-new-tokens", type=int, help="cap on generated tokens (default: the prompt's, 64)")
    g.add_argument("--batch-size", type=int, default=16, help="rows per generation batch")
    g.add_argument("--precision", choices=sorted(QUANTIZE), default="auto",
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

    p = sub.add_parser(
        "push", help="upload a prompt directory to the Hugging Face Hub",
        description="Upload a prompt directory (weights, configs, model card) to a Hub model repo; needs a token "
        "(`hf auth login` or HF_TOKEN).",
    )
    p.add_argument("--prompt", required=True, help="prompt directory (train --out, or a sweep's best/)")
    p.add_argument("--repo-id", required=True, help="USER/NAME or ORG/NAME; created if it does not exist")
    p.add_argument("--private", action="store_true", help="create the repository as private")

    p = sub.add_parser("data", help="inspect a data source", description="Load, clean and split data; print counts and examples.")
    p.add_argument("data", nargs="+", help="data sources (see train --data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--show", type=int, default=3, help="example pairs to print")

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

    p = sub.add_parser(
        "serve", help="serve prompts over HTTP with Ray Serve",
        description="Serve one base model with many soft prompts behind an HTTP endpoint (Ctrl-C stops).",
    )
    p.add_argument("--prompt", action="append", default=[], metavar="[NAME=]DIR",
                   help="prompt directory, optionally named; repeat for several (the first is the default)")
    p.add_argument("--prompt-store", metavar="DIR|gs://BUCKET/PREFIX",
                   help="serve every prompt directory under it by its relative path (model 'sweeps/x/best'), "
                   "loaded on first use; prompts written there later are served without a restart")
    p.add_argument("--prompt-cache-size", type=int, default=256, metavar="N",
                   help="store prompts each replica keeps loaded (LRU; default 256)")
    p.add_argument("--model", help="base model (default: the one the first --prompt records; needed with "
                   "--prompt-store alone)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000; with --demo a free one)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set PARAPHRASE_RAY_API_KEY)")
    p.add_argument("--allowed-hosts", nargs="+", default=[], metavar="HOST",
                   help="Host headers a server without an API key answers besides 127.0.0.1, localhost and [::1] "
                   "(any port); others get 403")
    _add_device_flag(p, "where the replica runs")
    p.add_argument("--address", help="Ray cluster address; default: start a local Ray")
    g = p.add_argument_group("back-pressure (also args in serve/config.yaml)")
    g.add_argument("--max-queued-rows", type=int, default=256, metavar="N",
                   help="texts waiting per replica; beyond them a request gets 503 with Retry-After (default 256)")
    g.add_argument("--request-timeout-s", type=float, default=60.0, metavar="S",
                   help="a request not answered within S seconds gets 504 and its generation stops (default 60)")
    g.add_argument("--max-request-work", type=int, default=8192, metavar="N",
                   help="work units one request may ask (input tokens + candidates x new tokens per text); "
                   "beyond: 413 (default 8192)")
    g.add_argument("--max-queued-work", type=int, default=16384, metavar="N",
                   help="work units waiting per replica; beyond them a request gets 503 with Retry-After (default 16384)")
    p.add_argument("--demo", action="store_true",
                   help="deploy on a fresh local Ray, ask every prompt (and zero-shot) two sample sentences at once "
                   "over HTTP, print the answers and the batching, shut down")

    p = sub.add_parser(
        "explain", help="nearest vocabulary tokens of each prompt vector",
        description="For each prompt position, the nearest vocabulary tokens in the input-embedding space.",
    )
    p.add_argument("--prompt", required=True, help="prompt directory")
    p.add_argument("--top-k", type=int, default=5, help="tokens per position")
    p.add_argument("--metric", choices=["cosine", "l2"], default="cosine", help="distance")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--model", help="override the prompt's recorded base model")
    return parser

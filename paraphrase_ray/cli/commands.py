"""The ``paraphrase-ray`` commands: each one turns its parsed flags into library calls and prints the result.

``cli.main.COMMANDS`` maps command names to these functions; ``cli.parser`` defines their flags. Heavy imports
(torch, Ray) happen inside each command, so importing this module (``paraphrase-ray --help``) stays fast.
Problems a user can fix are raised as ``paraphrase_ray.errors`` classes; ``main`` prints them as one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from paraphrase_ray.cli.parser import QUANTIZE
from paraphrase_ray.config import DEFAULT_CANDIDATES, RunConfig, from_dict, load_yaml, replace_nested
from paraphrase_ray.errors import ConfigError


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
    from paraphrase_ray.prompt.directory import check_out_dir
    from paraphrase_ray.training.precision import load_precision
    from paraphrase_ray.training.trainer import train

    cfg = build_run_config(args)
    check_out_dir(args.out)  # before loading the model: never a directory of other files (README.md)
    tc = cfg.train
    loaded = load_model(cfg.model, load_precision(tc.precision, tc.device), tc.device, cache=False)
    loaded.train_only = True  # nothing generates from it here: a bf16 run swaps its Linear weights in place
    out = Path(args.out)
    resume = out / "checkpoint" if args.resume else None
    result = train(loaded, cfg, out_dir=out, resume_from=resume)
    print(json.dumps(result.metrics()))
    if result.status == "nan":
        print("error: training diverged (NaN/inf loss); nothing was saved. Try a lower --lr.", file=sys.stderr)
        return 1
    return 0


def cmd_paraphrase(args: argparse.Namespace) -> int:
    from paraphrase_ray.api import decoding_for
    from paraphrase_ray.cli.jobs import JobOptions, flags, job_summary, paraphrase_job
    from paraphrase_ray.data import read_source_file
    from paraphrase_ray.files import write_records
    from paraphrase_ray.prompt.directory import PromptMeta
    from paraphrase_ray.storage import check_output, resolve_prompt_dir

    if (args.text is None) == (args.input is None):
        raise ConfigError("give exactly one of --text or --input")
    if args.input and not args.output:
        raise ConfigError("--input needs --output FILE.jsonl|FILE.parquet")
    if args.text is not None and not args.text.strip():
        raise ConfigError("--text is empty")
    if args.ray and args.input is None:
        raise ConfigError("--ray paraphrases files: give --input and --output")
    if args.ray and args.only_accepted:
        raise ConfigError("--only-accepted runs in-process; drop --ray (or filter the written rows on 'acceptable')")
    if args.output:  # before any work: never over what this did not write, never over its own input
        check_output(args.output, [args.input] if args.input else [], args.overwrite)
        if not args.ray and Path(args.output).is_dir():
            raise ConfigError(f"--output {args.output} is a directory: give a .jsonl or .parquet file (or use --ray)")
    shown = args.num_candidates  # asked for explicitly: every candidate is printed / written
    k, quantize = shown or DEFAULT_CANDIDATES, QUANTIZE[args.precision]
    args.prompt = str(resolve_prompt_dir(args.prompt))  # a gs:// prompt (a sweep's best/) is fetched once
    if args.ray:  # Ray Data: a pool of actors, each loading the model once; input/output local or gs://
        from paraphrase_ray.serve.batch import ActorPool, paraphrase_dataset

        gen = decoding_for(PromptMeta.read(args.prompt), k, max_new_tokens=args.max_new_tokens, quantize=quantize)
        pool = ActorPool(concurrency=args.concurrency, num_gpus=args.num_gpus, num_cpus=args.num_cpus,
                         batch_size=args.batch_size, address=args.address, overwrite=args.overwrite)
        out = paraphrase_dataset(args.prompt, args.input, args.output, gen, args.model, args.device, args.embedder, pool)
        print(f"wrote paraphrases to {out}/", file=sys.stderr)
        return 0
    rows = [{"source": args.text}] if args.text is not None else read_source_file(args.input)
    options = JobOptions(
        num_candidates=k, model=args.model, device=args.device, batch_size=args.batch_size, embedder=args.embedder,
        max_new_tokens=args.max_new_tokens, quantize=quantize, progress=args.input is not None and sys.stderr.isatty(),
    )
    # best candidate first when K > 1: usable, faithful, acceptable, then by objective (metrics.rank_candidates)
    cands, stats, scores = paraphrase_job(args.prompt, [r["source"] for r in rows], options)
    if args.stats:
        from paraphrase_ray.files import write_json

        write_json(args.stats, stats)
    if args.text is not None:
        ok = [c for c, s in zip(cands[0], scores[0]) if s.acceptable or not args.only_accepted]
        for c in ok if shown else ok[:1]:
            print(c)
        if not ok:  # --only-accepted and the detector rejects every candidate: say why, print no paraphrase
            print(f"rejected by the detector: {json.dumps(flags(scores[0][0]))}", file=sys.stderr)
        return 0
    records = []
    for row, c, s in zip(rows, cands, scores):
        if args.only_accepted and not s[0].acceptable:
            continue
        records.append({**row, "prediction": c[0], **flags(s[0]), **({"candidates": c} if shown and k > 1 else {})})
    stats["written"] = len(records)
    print(job_summary(stats, write_records(args.output, records)), file=sys.stderr)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from paraphrase_ray.prompt.hub import push_prompt

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


def _unique_name(name: str, taken: set[str]) -> str:
    candidate, i = name, 2
    while candidate in taken:
        candidate, i = f"{name}-{i}", i + 1
    return candidate


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``paraphrase-ray evaluate``: score prompts and/or the zero-shot baseline on the same held-out rows."""
    from paraphrase_ray.config import ZERO_SHOT, ZERO_SHOT_CHAT
    from paraphrase_ray.evaluation.embedder import load_embedder
    from paraphrase_ray.evaluation.report import (
        best_zero_shot,
        eval_pairs,
        evaluate_systems,
        format_examples,
        format_table,
        prompt_system,
        split_warnings,
        versus,
        zero_shot_systems,
    )
    from paraphrase_ray.files import write_json
    from paraphrase_ray.models import DEFAULT_MODEL, load_model
    from paraphrase_ray.prompt.bundle import System, load_bundle, load_prompt

    dirs = ([args.prompt] if args.prompt else []) + list(args.compare or [])
    if not dirs and not args.zero_shot:
        raise ConfigError(
            "nothing to evaluate: give --prompt DIR, --compare DIR [DIR ...], and/or --zero-shot"
        )
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    pairs = eval_pairs(args.data, args.split, args.val_fraction, args.seed, args.limit)

    systems: list[System] = []
    metas: dict[str, dict] = {}
    if dirs:
        loaded, first = load_prompt(dirs[0], args.model, args.device)
        bundles = [first] + [load_bundle(d, expected_dim=loaded.embed_dim) for d in dirs[1:]]
        taken: set[str] = {ZERO_SHOT, ZERO_SHOT_CHAT}
        for d, b in zip(dirs, bundles, strict=True):
            if args.model is None and b.base_model and b.base_model != loaded.name:
                raise ConfigError(
                    f"{d} was trained on {b.base_model!r} but {dirs[0]} on {loaded.name!r}; compare prompts of "
                    "one base model, or pass --model to force one"
                )
            b.prompt.to(loaded.device)
            name = _unique_name(Path(d).name or "prompt", taken)
            taken.add(name)
            systems.append(prompt_system(b, name))
            metas[name] = b.meta
    else:
        loaded = load_model(args.model or DEFAULT_MODEL, "auto", args.device)
    if args.zero_shot:
        # Same decoding as the (first) prompt, so the comparison isolates the soft prompt.
        systems += zero_shot_systems(loaded, systems[0].generation if systems else None)

    for w in (
        split_warnings(metas, args.data, args.val_fraction, args.seed) if args.split == "validation" else []
    ):
        print(w, file=sys.stderr)
    embedder = load_embedder(args.embedder, device=None if args.device == "auto" else args.device)
    print(
        f"evaluating {len(systems)} system(s) on {len(pairs)} {args.split} rows of {' '.join(args.data)} "
        f"with {loaded.name}",
        file=sys.stderr,
    )
    report = evaluate_systems(
        loaded, systems, pairs, embedder, args.batch_size, progress=sys.stderr.isatty(), num_candidates=args.num_candidates
    )
    best_zs = best_zero_shot(report)
    report = {
        "model": loaded.name,
        "data": list(args.data),
        "split": args.split,
        "val_fraction": args.val_fraction if args.split == "validation" else None,
        "seed": args.seed,
        "limit": args.limit,
        "embedder": args.embedder,
        "best_zero_shot": best_zs,
        **report,
    }
    print(format_table({n: s["summary"] for n, s in report["systems"].items()}))
    if best_zs is not None:
        for n, s in report["systems"].items():
            if s["kind"] == "prompt":
                print(versus(n, s["summary"], best_zs, report["systems"][best_zs]["summary"]))
    if args.examples > 0:
        print()
        print(format_examples(report, args.examples))
    if args.output:
        print(f"wrote report to {write_json(args.output, report)}", file=sys.stderr)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """``paraphrase-ray tune``: run (or resume) a sweep, print its leaderboard, export the best prompt."""
    import dataclasses

    from paraphrase_ray.sweep.driver import report_sweep
    from paraphrase_ray.sweep.spec import load_spec, smoke
    from paraphrase_ray.sweep.tracking import apply_flags

    spec = load_spec(args.space)
    name = args.name or Path(args.space).stem
    if args.resume and (args.smoke_test or args.num_samples is not None):
        print(
            "note: --resume continues the sweep as it was started; --smoke-test/--num-samples are ignored",
            file=sys.stderr,
        )
    if not args.resume and args.smoke_test:
        spec = smoke(spec)
    if not args.resume and args.num_samples is not None:
        if args.num_samples < 1:
            raise ConfigError("--num-samples must be >= 1")
        spec = dataclasses.replace(spec, num_samples=args.num_samples)
    spec = apply_flags(spec, args.mlflow, args.mlflow_uri, args.wandb)
    return report_sweep(spec, name, args.storage, args.resume, args.address, args.space)


def cmd_serve(args: argparse.Namespace) -> int:
    """``paraphrase-ray serve``: run in the foreground until Ctrl-C (also during start-up), then clean up;
    ``--demo``: deploy, ask every prompt once over HTTP, print, shut down."""
    import os
    import signal
    import time

    from paraphrase_ray.serve import runner
    from paraphrase_ray.serve.protocol import ENV_API_KEY, ZERO_SHOT, ServeSettings, parse_prompt_specs

    if args.demo:
        return runner.demo(list(args.prompt), args.port or 0)
    port = 8000 if args.port is None else args.port
    key = args.api_key or os.environ.get(ENV_API_KEY) or None
    keys = ("max_queued_rows", "request_timeout_s", "max_request_work", "max_queued_work")
    limits = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    hosts = tuple(getattr(args, "allowed_hosts", None) or ())
    store = getattr(args, "prompt_store", None)
    store = store if store is None or "://" in store else str(Path(store).expanduser().resolve())
    settings = ServeSettings(prompts=tuple(args.prompt), device=args.device, api_key=key, allowed_hosts=hosts,
                             prompt_store=store, model=getattr(args, "model", None),
                             prompt_cache_size=getattr(args, "prompt_cache_size", 256), **limits)
    names = [n for n, _ in parse_prompt_specs(settings.prompts)] or [ZERO_SHOT]
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        print(
            f"warning: binding {args.host} without an API key; anyone who can reach it may use it "
            f"(set --api-key or {ENV_API_KEY})"
        )
    # Ctrl-C / SIGINT stops the server even when this process inherited SIGINT as ignored (POSIX shells start
    # background jobs `paraphrase-ray serve ... &` that way, and Python then installs no handler); SIGTERM (process
    # managers, `kill`) shuts down the same clean way.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server = runner.LocalServe(args.address)
    try:
        url = server.deploy(settings, args.host, port, args.device)
        print(
            f"serving prompts {', '.join(names)} (default {names[0]}; also {ZERO_SHOT!r}) at {url}  "
            f"docs: {url}/docs  auth: {'on' if key else 'off'}  (Ctrl-C stops)"
            + (f"\nprompt store: {store} (any prompt directory under it, by relative path)" if store else "")
            + f"\nOpenAI API: {url}/v1 (GET /v1/models lists every prompt)",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        server.shutdown()
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """``paraphrase-ray explain``: the nearest vocabulary tokens of each prompt vector, as a table or JSON."""
    from paraphrase_ray.prompt.bundle import load_prompt
    from paraphrase_ray.prompt.explain import explain_prompt, format_explanation

    loaded, bundle = load_prompt(args.prompt, args.model, "cpu")
    exp = explain_prompt(bundle.prompt, loaded.model.get_input_embeddings(), loaded.tokenizer, args.top_k, args.metric)
    print(json.dumps(exp, indent=2, ensure_ascii=False) if args.json else format_explanation(exp))
    return 0

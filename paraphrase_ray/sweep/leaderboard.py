"""A sweep's results as a leaderboard (CSV + printed table), a plot, and overhead numbers. No Ray here.

``paraphrase_ray.sweep.driver`` turns Tune's results into ``TrialRecord``s (every report a trial made, its Tune status,
its error); everything below is plain functions over those, so it is tested without a cluster.

Status of a trial in the leaderboard:
    completed / early_stopped / nan   as ``train()`` ended it (nan: the loss diverged; scored as the worst value)
    pruned                            ASHA stopped it before its step budget
    error                             it raised (after ``max_failures`` retries): OOM, a bad node, a bug
    running / pending / paused        the sweep was interrupted; ``--resume`` finishes it
    baseline                          zero-shot (and zero-shot-chat) without a soft prompt, same held-out rows
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

from paraphrase_ray.config import ZERO_SHOT
from paraphrase_ray.sweep.spec import COMPONENTS, SweepSpec, SweepStorage

LEADERBOARD_FILE, PLOT_FILE = "leaderboard.csv", "sweep.png"
FINISHED = ("completed", "early_stopped")


@dataclass
class TrialRecord:
    trial_id: str
    tune_status: str  # TERMINATED | ERROR | RUNNING | PENDING | PAUSED
    config: dict[str, Any]  # the searched values
    reports: list[dict[str, Any]] = field(default_factory=list)  # every tune.report, in order
    error: str = ""


def saved_config(result: Any) -> dict[str, Any]:
    """The config Tune saved beside a trial (``params.json``), for a ``Result`` without one: a trial that failed
    before the sweep was interrupted, and never reported, comes back from ``--resume`` with no config."""
    try:
        with result.filesystem.open_input_stream(f"{result.path}/params.json") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return {}


def _num(v: Any) -> float | None:
    """``v`` when it is a real number (not bool, not NaN), else None."""
    if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
        return None
    return v


def trial_status(rec: TrialRecord, steps: int) -> str:
    if rec.tune_status == "ERROR":
        return "error"
    if rec.tune_status != "TERMINATED":
        return rec.tune_status.lower()
    last = rec.reports[-1] if rec.reports else {}
    if isinstance(last.get("train_status"), str):
        return last["train_status"]  # the trial's final report
    return "completed" if (_num(last.get("step")) or 0) >= steps else "pruned"  # ASHA stopped it mid-way


def leaderboard(
    records: list[TrialRecord], spec: SweepSpec, zero_shot: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per trial from its best-scoring report, best first; then the zero-shot rows (per base model)."""
    metric, sign = spec.objective.metric, (1 if spec.objective.mode == "max" else -1)
    rows = []
    for rec in records:
        scored = [r for r in rec.reports if _num(r.get(metric)) is not None]
        best = max(scored, key=lambda r: sign * r[metric]) if scored else {}
        last = rec.reports[-1] if rec.reports else {}
        row: dict[str, Any] = {"trial_id": rec.trial_id, "status": trial_status(rec, spec.run.train.steps)}
        row.update({k: rec.config.get(k) for k in spec.search})
        row.update({k: best.get(k) for k in (*COMPONENTS, "val_loss", "train_loss")})
        row.update(
            best_step=best.get("step"),
            steps=last.get("step"),
            wall_s=_round(last.get("time_total_s")),
            setup_s=last.get("setup_s"),
            precision=last.get("precision"),  # the frozen weights' training precision and why
            worker_pid=last.get("worker_pid"),
            worker_trial=last.get("worker_trial"),
            error=rec.error,
        )
        rows.append(row)
    rows.sort(key=lambda r: -sign * r[metric] if _num(r.get(metric)) is not None else math.inf)
    for z in zero_shot:
        row = {"trial_id": z.get("system", ZERO_SHOT), "status": "baseline"}
        row.update({k: (z["model"] if k == "model" else None) for k in spec.search})
        row.update({k: z.get(k) for k in COMPONENTS}, wall_s=z.get("wall_s"))
        rows.append(row)
    return rows


def _round(v: Any, nd: int = 1) -> float | None:
    return round(v, nd) if _num(v) is not None else None


def columns(spec: SweepSpec) -> list[str]:
    return [
        "trial_id",
        "status",
        *spec.search,
        *COMPONENTS,
        "val_loss",
        "train_loss",
        "best_step",
        "steps",
        "wall_s",
        "setup_s",
        "precision",
        "worker_pid",
        "worker_trial",
        "error",
    ]


def write_leaderboard(store: SweepStorage, rows: list[dict[str, Any]], spec: SweepSpec) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns(spec), extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    store.write_bytes(LEADERBOARD_FILE, buf.getvalue().encode())


def format_table(rows: list[dict[str, Any]], spec: SweepSpec, limit: int = 20) -> str:
    """The leaderboard as fixed-width text: the top ``limit`` trials, then the zero-shot rows."""
    cols = [
        "trial_id",
        "status",
        *spec.search,
        "objective",
        "faithful_success_rate",
        "adequacy",
        "self_bleu",
        "copy_rate",
        "empty_rate",
        "val_loss",
        "steps",
        "wall_s",
    ]
    if spec.objective.metric not in cols:
        cols.insert(2 + len(spec.search), spec.objective.metric)
    shown = [r for r in rows if r["status"] != "baseline"][:limit] + [
        r for r in rows if r["status"] == "baseline"
    ]

    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    header = [c.split(".")[-1] for c in cols]
    cells = [[fmt(r.get(c)) for c in cols] for r in shown]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def write_plot(store: SweepStorage, rows: list[dict[str, Any]], spec: SweepSpec) -> None:
    """Objective vs prompt length (colour: init, size: learning rate) and vs learning rate; zero-shot dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    metric = spec.objective.metric
    trials = [r for r in rows if r["status"] != "baseline" and _num(r.get(metric)) is not None]
    n_tokens = [spec.value("prompt.n_tokens", r) for r in trials]
    inits = [str(spec.value("prompt.init", r)) for r in trials]
    lrs = [spec.value("train.lr", r) for r in trials]
    colours = dict(zip(sorted(set(inits)), plt.get_cmap("tab10").colors, strict=False))
    lo, hi = (min(lrs), max(lrs)) if lrs else (1.0, 1.0)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for r, n, init, lr in zip(trials, n_tokens, inits, lrs, strict=True):
        size = 40 + 200 * (math.log(lr / lo) / math.log(hi / lo) if hi > lo else 0.5)
        marker = "o" if r["status"] in FINISHED else "v"
        style = {"color": colours[init], "marker": marker, "alpha": 0.85, "edgecolor": "k"}
        axes[0].scatter(n, r[metric], s=size, **style)
        axes[1].scatter(lr, r[metric], s=70, **style)
    for z in (r for r in rows if r["status"] == "baseline" and _num(r.get(metric)) is not None):
        label = f"{z['trial_id']} {z.get('model') or ''}".strip()
        for ax in axes:
            ax.axhline(z[metric], ls="--", color="grey", lw=1)
            ax.annotate(
                label,
                (0.01, z[metric]),
                xycoords=("axes fraction", "data"),
                fontsize=8,
                color="grey",
                va="bottom",
            )
    for init, c in colours.items():
        axes[0].scatter([], [], color=c, edgecolor="k", label=f"init={init}")
    axes[0].scatter([], [], color="w", edgecolor="k", marker="v", label="stopped early (ASHA / NaN)")
    axes[0].legend(fontsize=8, loc="best")
    axes[0].set(
        xscale="log",
        xlabel="prompt length (tokens; marker size: learning rate)",
        ylabel=metric,
        title=f"{metric} vs prompt length",
    )
    axes[1].set(xscale="log", xlabel="learning rate", ylabel=metric, title=f"{metric} vs learning rate")
    if n_tokens:  # plain integers on the log axis, at the lengths actually tried
        ticks = sorted(set(n_tokens))
        axes[0].set_xticks(ticks if len(ticks) <= 10 else ticks[:: math.ceil(len(ticks) / 10)])
        axes[0].xaxis.set_major_formatter(ScalarFormatter())
        axes[0].xaxis.set_minor_formatter(NullFormatter())
    else:
        axes[0].text(0.5, 0.5, "no trial reported a score", ha="center", transform=axes[0].transAxes)
    failed = sum(r["status"] == "error" for r in rows)
    fig.suptitle(
        f"sweep {store.name}: {len(trials)} scored trials" + (f", {failed} failed" if failed else "")
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    store.write_bytes(PLOT_FILE, buf.getvalue())


def overhead(records: list[TrialRecord], fit_s: float, spec: SweepSpec) -> dict[str, Any]:
    """Where a sweep's time went beyond training and scoring.

    ``reuse_gap_s``: on a reused worker process, from one trial's last report to the next trial's first line
    (Tune's reset + scheduling). ``fresh_setup_s``: a trial's setup (model load included) in a new process;
    ``reused_setup_s``: the same in a reused one. ``overhead_s_per_trial``: slot-seconds the sweep held
    (fit time x concurrency) minus the seconds trials spent training and scoring, per trial: process start,
    imports, model load, Tune's scheduling and reset (and a zero-shot task holding a slot, when there is one).
    """
    firsts = [r.reports[0] for r in records if r.reports]
    lasts = [r.reports[-1] for r in records if r.reports]
    fresh = [f["setup_s"] for f in firsts if f.get("model_fresh_load")]
    reused = [f["setup_s"] for f in firsts if f.get("model_fresh_load") is False]
    gaps, by_pid = [], {}
    for first, last in sorted(zip(firsts, lasts, strict=True), key=lambda fl: fl[0].get("trial_start", 0)):
        pid = first.get("worker_pid")
        if pid in by_pid and first.get("trial_start"):
            gaps.append(first["trial_start"] - by_pid[pid])
        by_pid[pid] = last.get("report_time", 0)
    # Seconds spent training and scoring: a trial's time in Tune minus its setup (process, imports, model load).
    work = sum(
        (_num(last.get("time_total_s")) or 0) - (_num(first.get("setup_s")) or 0)
        for first, last in zip(firsts, lasts, strict=True)
    )
    slots = min(spec.max_concurrent_trials, len(records)) or 1
    n = max(1, len(records))

    def mean(xs: list[float]) -> float | None:
        return round(sum(xs) / len(xs), 2) if xs else None

    return {
        "fit_s": round(fit_s, 1),
        "trials": len(records),
        "worker_processes": len(by_pid),
        "fresh_setup_s": mean(fresh),
        "reused_setup_s": mean(reused),
        "reuse_gap_s": mean(gaps),
        "eval_s": mean([r["eval_s"] for r in lasts if _num(r.get("eval_s")) is not None]),
        "overhead_s_per_trial": round(max(0.0, fit_s * slots - work) / n, 1),
    }

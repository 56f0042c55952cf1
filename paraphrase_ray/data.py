"""Paraphrase pairs: reading, cleaning, splitting, templating and tokenizing with a target-only loss mask.

Sources (``DataConfig.sources``):
    path.jsonl | .csv | .tsv | .parquet   columns ``source``/``target`` (configurable); ``label`` filters to 1
    hf:NAME[/CONFIG][:SPLIT]              a Hugging Face dataset, e.g. hf:glue/mrpc, hf:paws/labeled_final
    sample                                the small set we wrote and ship in ``paraphrase_ray/resources``

One example is laid out as ``[soft prompt][prefix + source][separator][target_prefix + target][eos]`` and the
loss mask (labels != -100) covers only the target tokens and eos.
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from paraphrase_ray.config import DataConfig, TemplateConfig
from paraphrase_ray.errors import DataError

IGNORE = -100
SAMPLE_PATH = Path(__file__).parent / "resources" / "sample.jsonl"



@dataclass(frozen=True)
class Pair:
    source: str
    target: str


@dataclass
class DataReport:
    """What cleaning did, per reason, so users see why rows vanished."""

    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    first_malformed_line: int | None = None  # 1-based line of the first row that is not a JSON object

    def summary(self) -> str:
        drops = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        return f"read {self.read} rows, kept {self.kept}; dropped: {drops}"


# -- reading ---------------------------------------------------------------------------------------------------
def read_rows(spec: str, cfg: DataConfig, report: DataReport) -> list[dict[str, Any]]:
    """Raw rows (dicts) from one source spec."""
    if spec == "sample":
        return _read_jsonl(SAMPLE_PATH, report)
    if spec.startswith("hf:"):
        return _read_hf(spec[3:], cfg)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"data source {spec!r} is not a file, an hf: spec, or 'sample'")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, report)
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path} is not a readable Parquet file: {e}") from e
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv, .tsv or .parquet")


def _read_jsonl(path: Path, report: DataReport) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                report.read += 1
                report.dropped["malformed"] += 1
                report.first_malformed_line = report.first_malformed_line or number
                continue
            rows.append(row)
    return rows


def _read_hf(spec: str, cfg: DataConfig) -> list[dict[str, Any]]:
    """hf:NAME[/CONFIG][:SPLIT]; streams when ``limit`` is set so huge sets (ParaNMT, ParaBank) stay cheap."""
    import itertools

    from datasets import load_dataset

    name, _, split = spec.partition(":")
    parts = name.split("/")
    # "glue/mrpc" is (dataset, config); "user/dataset" hub ids also have one slash -- try both readings.
    attempts = [(name, None)]
    if len(parts) >= 2:
        attempts.insert(0, ("/".join(parts[:-1]), parts[-1]))
    errors = []
    for ds_name, ds_cfg in attempts:
        try:
            ds = load_dataset(ds_name, ds_cfg, split=split or "train", streaming=cfg.limit is not None)
            it = iter(ds)
            return list(itertools.islice(it, cfg.limit * 2 if cfg.limit else None))
        except Exception as e:  # datasets raises many types: missing, offline, bad config
            errors.append(f"{ds_name}" + (f" (config {ds_cfg})" if ds_cfg else "") + f": {str(e).splitlines()[0]}")
    raise DataError(
        f"could not load Hugging Face dataset {spec!r}; tried " + "; ".join(errors)
        + ". Fix: check the name, or set HF_DATASETS_OFFLINE=0 with network access, or use a local file."
    )


def _columns(row: dict[str, Any], cfg: DataConfig) -> tuple[str, str]:
    if cfg.source_column in row and cfg.target_column in row:
        return cfg.source_column, cfg.target_column
    if "sentence1" in row and "sentence2" in row:  # GLUE/PAWS naming
        return "sentence1", "sentence2"
    raise DataError(
        f"rows have columns {sorted(row)} but no {cfg.source_column!r}/{cfg.target_column!r}; "
        "set data.source_column / data.target_column"
    )


def clean(rows: list[dict[str, Any]], cfg: DataConfig, report: DataReport, spec: str) -> list[Pair]:
    """Keep usable pairs: label 1 only, non-empty, not over-long, not duplicated."""
    if not rows:
        return []
    src_col, tgt_col = _columns(rows[0], cfg)
    seen: set[tuple[str, str]] = set()
    out: list[Pair] = []
    for row in rows:
        report.read += 1
        if cfg.label_column in row and str(row[cfg.label_column]).strip() not in ("1", "1.0", "True", "true"):
            report.dropped["label != 1"] += 1
            continue
        src, tgt = row.get(src_col), row.get(tgt_col)
        if not isinstance(src, str) or not isinstance(tgt, str):
            report.dropped["missing or non-text field"] += 1
            continue
        src, tgt = " ".join(src.split()), " ".join(tgt.split())
        if not src or not tgt:
            report.dropped["empty"] += 1
            continue
        if len(src) > cfg.max_chars or len(tgt) > cfg.max_chars:
            report.dropped["over-long"] += 1
            continue
        if (src, tgt) in seen:
            report.dropped["duplicate"] += 1
            continue
        seen.add((src, tgt))
        out.append(Pair(src, tgt))
        if cfg.limit is not None and len(out) >= cfg.limit:
            break
    report.kept += len(out)
    return out


def load_pairs(cfg: DataConfig) -> tuple[list[Pair], list[Pair], DataReport]:
    """(train, validation, report). The split is made per source before interleaving, deterministic by seed."""
    report = DataReport()
    trains, vals = [], []
    for spec in cfg.sources:
        pairs = clean(read_rows(spec, cfg, report), cfg, report, spec)
        if not pairs:
            raise DataError(f"data source {spec!r} has no usable rows ({report.summary()})")
        train, val = split_pairs(pairs, cfg)
        if cfg.max_train_self_bleu is not None or cfg.min_train_self_bleu is not None:
            train = filter_self_bleu(train, cfg.min_train_self_bleu, cfg.max_train_self_bleu, report)
        if cfg.drop_unfaithful_targets:
            train = filter_unfaithful(train, report)
        trains.append(train)
        vals.append(val)
    train = interleave(trains, cfg.weights, cfg.seed)
    val = [p for v in vals for p in v]
    if cfg.both_directions:
        # augmentation after the split, so a validation pair's reverse never leaks into training
        train = train + [Pair(p.target, p.source) for p in train]
        random.Random(cfg.seed + 1).shuffle(train)
    return train, val, report


def filter_self_bleu(
    pairs: list[Pair], min_self_bleu: float | None, max_self_bleu: float | None, report: DataReport
) -> list[Pair]:
    """Training pairs whose sentence BLEU of target vs source is in [min, max), each side's drops counted:
    near-copies (>= max) teach a small LM to copy, free rewrites (< min) often change the meaning."""
    from paraphrase_ray.text import sentence_bleu

    kept, near_copy, free = [], 0, 0
    for p in pairs:
        b = sentence_bleu(p.target, p.source)
        if max_self_bleu is not None and b >= max_self_bleu:
            near_copy += 1
        elif min_self_bleu is not None and b < min_self_bleu:
            free += 1
        else:
            kept.append(p)
    if near_copy:
        report.dropped[f"near-copy (train self-BLEU >= {max_self_bleu:g})"] += near_copy
    if free:
        report.dropped[f"free rewrite (train self-BLEU < {min_self_bleu:g})"] += free
    report.kept -= near_copy + free
    if not kept:
        raise DataError(
            f"data.min_train_self_bleu={min_self_bleu} / data.max_train_self_bleu={max_self_bleu} drop every "
            "training pair; widen the range"
        )
    return kept


def filter_unfaithful(pairs: list[Pair], report: DataReport) -> list[Pair]:
    """Training pairs whose target keeps the source's facts (no invented name or number, no dropped number)."""
    from paraphrase_ray.text import check

    kept = [p for p in pairs if check(p.source, p.target).faithful]
    if len(kept) < len(pairs):
        report.dropped["unfaithful target (invents a name or number, or drops a number)"] += len(pairs) - len(kept)
        report.kept -= len(pairs) - len(kept)
    if not kept:
        raise DataError("data.drop_unfaithful_targets drops every training pair")
    return kept


def split_pairs(pairs: list[Pair], cfg: DataConfig) -> tuple[list[Pair], list[Pair]]:
    order = list(range(len(pairs)))
    random.Random(cfg.seed).shuffle(order)
    n_val = cfg.val_size if cfg.val_size is not None else int(round(len(pairs) * cfg.val_fraction))
    n_val = min(n_val, len(pairs) - 1) if len(pairs) > 1 else 0
    val = [pairs[i] for i in order[:n_val]]
    train = [pairs[i] for i in order[n_val:]]
    return train, val


def interleave(groups: list[list[Pair]], weights: tuple[float, ...], seed: int) -> list[Pair]:
    """Without weights: all sources, shuffled together. With weights: draw by probability until the first
    drawn source runs out (datasets' 'first_exhausted'), so a small source is not silently repeated."""
    if len(groups) == 1:
        return list(groups[0])
    rng = random.Random(seed)
    if not weights:
        out = [p for g in groups for p in g]
        rng.shuffle(out)
        return out
    w = list(weights)
    pos = [0] * len(groups)
    out: list[Pair] = []
    while True:
        g = rng.choices(range(len(groups)), weights=w)[0]
        if pos[g] >= len(groups[g]):
            return out
        out.append(groups[g][pos[g]])
        pos[g] += 1


# -- templating and tokenization -------------------------------------------------------------------------------
def encode_source(tokenizer: Any, source: str, template: TemplateConfig, max_source_tokens: int) -> list[int]:
    """Token ids for ``prefix + source + separator`` (BOS included when the tokenizer adds one).

    The source is truncated, never the separator: the model must always see where the paraphrase begins.
    """
    if template.chat:
        return encode_chat(tokenizer, template.prefix, source, template.separator, max_source_tokens)
    src_ids = tokenizer(template.prefix + source, add_special_tokens=True)["input_ids"]
    sep_ids = tokenizer(template.separator, add_special_tokens=False)["input_ids"] if template.separator else []
    return src_ids[:max_source_tokens] + sep_ids


def encode_chat(tokenizer: Any, prefix: str, source: str, suffix: str = "", max_source_tokens: int = 64) -> list[int]:
    """Ids of the chat template around one user turn ``prefix + source + suffix``, ending with the assistant
    header (``add_generation_prompt``). The source is cut to ``max_source_tokens``; the rest is kept."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("template.chat is set but the tokenizer has no chat template; use a chat model or chat: false")
    src_ids = tokenizer(source, add_special_tokens=False)["input_ids"]
    if len(src_ids) > max_source_tokens:
        source = tokenizer.decode(src_ids[:max_source_tokens])
    msgs = [{"role": "user", "content": prefix + source + suffix}]
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def encode_pair(
    tokenizer: Any, pair: Pair, template: TemplateConfig, max_source_tokens: int, max_target_tokens: int
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one example; labels are IGNORE on source/separator positions.

    A target cut by ``max_target_tokens`` gets no eos, so truncation never teaches the model to stop early.
    """
    prompt_ids = encode_source(tokenizer, pair.source, template, max_source_tokens)
    tgt_ids = tokenizer(template.target_prefix + pair.target, add_special_tokens=False)["input_ids"]
    truncated = len(tgt_ids) > max_target_tokens
    tgt_ids = tgt_ids[:max_target_tokens]
    if not truncated and tokenizer.eos_token_id is not None:
        tgt_ids = tgt_ids + [tokenizer.eos_token_id]
    input_ids = prompt_ids + tgt_ids
    labels = [IGNORE] * len(prompt_ids) + tgt_ids
    return input_ids, labels


@dataclass
class Batch:
    input_ids: torch.Tensor  # (batch, seq) right-padded
    attention_mask: torch.Tensor  # (batch, seq) 1 on real tokens
    labels: torch.Tensor  # (batch, seq) IGNORE outside targets

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-pad (training keeps positions 0..n for real tokens; the prompt sits before them)."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
        labels[i, : len(y)] = torch.tensor(y)
    return Batch(ids, mask, labels)


class BatchStream:
    """Endless shuffled batches over pre-tokenized examples; reshuffles each epoch, deterministic by seed."""

    def __init__(self, encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, seed: int):
        if not encoded:
            raise DataError("no training examples to batch")
        self.encoded, self.batch_size, self.pad_id = encoded, batch_size, pad_id
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.epoch = 0

    def next(self) -> Batch:
        if len(self.order) < self.batch_size:
            fresh = list(range(len(self.encoded)))
            self.rng.shuffle(fresh)
            self.order += fresh
            self.epoch += 1
        idx, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return collate([self.encoded[i] for i in idx], self.pad_id)


def read_source_file(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL/CSV/TSV/Parquet file to paraphrase; each needs a non-empty string ``source``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"input file not found: {p}")
    report = DataReport()
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _read_jsonl(p, report)
        if report.dropped["malformed"]:
            n = report.dropped["malformed"]
            more = f" ({n} malformed lines in all)" if n > 1 else ""
            raise DataError(f"{p}: line {report.first_malformed_line} is not a JSON object{more}")
    elif suffix in (".csv", ".tsv"):
        with p.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix == ".parquet":
        rows = read_rows(str(p), DataConfig(), report)
    else:
        raise DataError(f"{p}: unsupported input type {suffix!r}; use .jsonl, .csv, .tsv or .parquet")
    for i, row in enumerate(rows, 1):
        src = row.get("source")
        if not isinstance(src, str) or not src.strip():
            raise DataError(f"{p}: row {i} has no non-empty 'source' field")
    if not rows:
        raise DataError(f"{p} has no rows")
    return rows

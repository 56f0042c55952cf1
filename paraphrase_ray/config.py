"""Typed, frozen configuration for every pipeline stage.

YAML files and CLI flags both map onto these dataclasses (``load_yaml`` / ``from_dict``); an unknown key is an
error that names the key, never a silent default. Every value is checked against its field's type (pydantic, strict):
``train.steps: 12.7`` is "train.steps must be an integer, got 12.7", and ``chat: "false"`` (a quoted string) is an
error, not a truthy value. One leniency: numbers written the YAML 1.1 way (``3e-2``, which PyYAML reads as a
string) are numbers. Cross-field checks live in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from paraphrase_ray.errors import ConfigError
from paraphrase_ray.typecheck import check_value
from paraphrase_ray.typecheck import field_types as _field_types

T = TypeVar("T")

INIT_STRATEGIES = ("vocab", "random", "random_std", "text")
PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULES = ("cosine", "linear", "constant", "plateau")
QUANTIZE_METHODS = ("auto", "q4", "int8", "none")
# Candidates sampled and reranked per text by `paraphrase`, `evaluate` and the Python API (1 = greedy). Measured on
# 100 held-out MRPC rows (docs/BENCHMARKS.md, "Quality"): faithful success 0.60 at 1, 0.88 at 8, for 12x the time.
DEFAULT_CANDIDATES = 8
# The name of the base model run with no soft prompt: a report's baseline system and Serve's reserved prompt.
RERANK_METHODS = ("detector", "roundtrip")
ZERO_SHOT = "zero-shot"
# The base model with no soft prompt, its source wrapped in the chat template (instruction-tuned models only).
ZERO_SHOT_CHAT = "zero-shot-chat"



@dataclass(frozen=True)
class PromptConfig:
    """How the soft prompt is shaped and initialised."""

    n_tokens: int = 20  # number of learned vectors prepended to every input
    init: str = "vocab"  # vocab | random | random_std | text
    init_text: str = "Paraphrase the following sentence:"  # used by init=text
    vocab_top_k: int = 5000  # init=vocab samples from the k most common (lowest-id) non-special tokens
    random_range: float = 0.5  # init=random: uniform(-r, r), as in Lester et al. 2021
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.n_tokens <= 512:
            raise ConfigError(f"prompt.n_tokens must be in 1..512, got {self.n_tokens}")
        if self.init not in INIT_STRATEGIES:
            raise ConfigError(f"prompt.init must be one of {INIT_STRATEGIES}, got {self.init!r}")
        if self.init == "text" and not self.init_text.strip():
            raise ConfigError("prompt.init=text needs a non-empty prompt.init_text")
        if self.random_range <= 0:
            raise ConfigError("prompt.random_range must be > 0")


@dataclass(frozen=True)
class TemplateConfig:
    """Layout of one example: [soft prompt][prefix][source][separator][target][eos].

    The loss covers only target and eos. The same layout is used at generation time, up to the separator.
    """

    prefix: str = ""
    separator: str = "\nParaphrase:"
    target_prefix: str = " "  # put before the target so its first word tokenizes as in running text
    # chat: wrap prefix + source + separator as the user turn of the tokenizer's chat template; its assistant
    # header then marks where the paraphrase begins (the soft prompt still goes first). Needs a chat model.
    chat: bool = False


@dataclass(frozen=True)
class DataConfig:
    """Where paraphrase pairs come from and how they are cleaned and split."""

    sources: tuple[str, ...] = ("sample",)  # file paths, hf:name[/config][:split], or "sample"
    weights: tuple[float, ...] = ()  # interleaving probabilities, one per source (default: equal)
    source_column: str = "source"
    target_column: str = "target"
    label_column: str = "label"  # when present, only rows with label == 1 are kept
    val_fraction: float = 0.1
    val_size: int | None = None  # absolute validation size; overrides val_fraction
    seed: int = 0
    both_directions: bool = False  # augmentation: also train target -> source
    # drop *training* pairs whose target repeats the source (sentence BLEU of target vs source >= this, 0..100):
    # near-copies teach a small LM to copy. Validation is never filtered. None keeps every pair.
    max_train_self_bleu: float | None = None
    # drop *training* pairs rewritten so freely that they often change the meaning (self-BLEU < this). On MRPC
    # positives only 56% of pairs under self-BLEU 20 keep MiniLM adequacy >= 0.75, vs 68-90% between 20 and 60.
    min_train_self_bleu: float | None = None
    # drop *training* pairs whose target invents a name or number the source lacks, or drops a source number
    # (text.check): MRPC "paraphrases" often add facts, and the prompt learns to add them too
    drop_unfaithful_targets: bool = False
    max_source_tokens: int = 64
    max_target_tokens: int = 64
    max_chars: int = 1000  # rows longer than this (either side) are dropped as over-long
    limit: int | None = None  # cap on rows read per source (after cleaning)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources is empty: give at least one file, hf: spec, or 'sample'")
        if self.weights and len(self.weights) != len(self.sources):
            raise ConfigError(
                f"data.weights has {len(self.weights)} entries but data.sources has {len(self.sources)}"
            )
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
            raise ConfigError("data.weights must be non-negative and not all zero")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_train_self_bleu is not None and not 0 < self.max_train_self_bleu <= 100:
            raise ConfigError(f"data.max_train_self_bleu must be in (0, 100], got {self.max_train_self_bleu}")
        if self.min_train_self_bleu is not None and not 0 <= self.min_train_self_bleu < 100:
            raise ConfigError(f"data.min_train_self_bleu must be in [0, 100), got {self.min_train_self_bleu}")
        lo, hi = self.min_train_self_bleu, self.max_train_self_bleu
        if lo is not None and hi is not None and lo >= hi:
            raise ConfigError(f"data.min_train_self_bleu ({lo:g}) must be below data.max_train_self_bleu ({hi:g})")
        if self.max_source_tokens < 1 or self.max_target_tokens < 1:
            raise ConfigError("data.max_source_tokens and data.max_target_tokens must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """One prompt-training run."""

    steps: int = 200
    batch_size: int = 8
    lr: float = 0.03
    optimizer: str = "adamw"  # the only optimizer; a field so YAML can name it explicitly
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"  # cosine | linear | constant (after warm-up) | plateau
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine/linear decay floor, as a fraction of lr
    plateau_factor: float = 0.5
    plateau_patience: int = 2  # evaluations without improvement before the plateau schedule cuts lr
    grad_clip: float = 1.0
    # loss weight of target tokens that also occur in the input (source and template). Paraphrase pairs are
    # mostly copied tokens, so plain cross-entropy teaches a small LM to copy; < 1 makes the prompt learn from
    # the rewritten tokens. 1.0 is plain cross-entropy.
    copy_token_weight: float = 1.0
    eval_every: int = 50
    eval_batches: int | None = 8  # cap on validation batches (of 2 x batch_size rows) per evaluation; None: all
    early_stop_patience: int | None = 5  # evaluations without improvement before stopping
    checkpoint_every: int | None = None  # steps between resumable checkpoints (None: at each eval)
    precision: str = "auto"  # auto | bf16 | fp32 (frozen weights; the prompt is always fp32)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.lr < 10:
            raise ConfigError(f"train.lr must be in (0, 10), got {self.lr}")
        if self.optimizer != "adamw":
            raise ConfigError(f"train.optimizer must be 'adamw', got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.eval_every < 1:
            raise ConfigError("train.eval_every must be >= 1")
        if not 0 < self.copy_token_weight <= 1:
            raise ConfigError(f"train.copy_token_weight must be in (0, 1], got {self.copy_token_weight}")
        if self.warmup_steps < 0:
            raise ConfigError("train.warmup_steps must be >= 0")


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding options shared by the CLI, the evaluator and Serve."""

    max_new_tokens: int = 64  # hard cap
    max_new_tokens_ratio: float = 2.0  # per row: at most ratio x source tokens + 8
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # HF-style, over generated tokens
    # HF's repetition-penalty rule over the *source's* tokens: a blunt anti-copy lever (it also pushes the model
    # off names and numbers it should keep), so off by default; source_no_repeat_ngram_size does the job better
    source_repetition_penalty: float = 1.0
    source_penalty_skip_common: bool = False  # leave punctuation and function words out of the source penalty
    no_repeat_ngram_size: int = 3  # no 3-gram twice in the output: stops the loops small models fall into
    # n > 0: never copy n consecutive source tokens (HF's encoder_no_repeat_ngram_size, which decoder-only
    # generation from inputs_embeds lacks; "dynamic blocking" in unsupervised paraphrasing). Unlike the source
    # penalty it leaves every source word available -- names and numbers survive -- and only breaks long runs.
    source_no_repeat_ngram_size: int = 4
    # never start a capitalised word (after the first) or a number that the source lacks, never garble one it
    # has ("El Paso" -> "El Pines"): generation.fact_guard.FactGuard, in the fast loop and as an HF processor alike
    fact_guard: bool = True
    # words too (generation/word_guard.py): write only the source's words, their inflections and grammar words,
    # never end on a half-written word, and do not end the sentence before covering word_coverage of the source's
    # content (weighted); the blind readers' verdicts behind it: docs/BENCHMARKS.md, "The reader's measure".
    # Coverage 0 by default: forced to go on, greedy SmolLM2 rambled (12 dev rows at 0.9, by reading); with K
    # candidates the rerank's detector prefers the ones that cover the source instead
    word_guard: bool = False
    word_coverage: float = 0.0
    # frozen Linear weights when generating on CPU (generation/backends/lowbit.py): auto = the exact Q4_1/Q8_0 kernel when the weights
    # are llama.cpp blocks (the embedded model), else fbgemm int8; none = the exact fp32 path. Training is fp32.
    quantize: str = "auto"
    # greedy, one row at a time: draft up to this many tokens from the source and verify them in one forward
    # pass (generation/lookup.py; same tokens, fewer passes; measured 1.2x at batch 1 on CPU). 0 = off
    prompt_lookup: int = 4
    # compute the keys and values of [soft prompt][template head] once per prompt and reuse them for every row
    # (generation/prefix_cache.py; same tokens, a shorter prefill). false = prefill every row whole
    prefix_cache: bool = True
    # decode steps on a GPU through a static KV cache replayed as CUDA graphs, one per (rows, capacity) bucket
    # (generation/backends/cuda_graphs.py; same tokens). auto = on CUDA; eager = the static-cache step uncaptured (any device, for
    # checking); off = the plain forward
    cuda_graphs: str = "auto"
    num_return_sequences: int = 1
    # how K > 1 candidates are ordered, within the hard tiers (usable, faithful, no broken word):
    # "roundtrip": by the base LM's round trip, log P(output | source) + log P(source | output) / 2
    # (evaluation/likelihood.py; 2 forward passes per candidate); "detector": by the word-level verdict, then
    # novelty (metrics.rank_candidates). Chosen by blind readers: docs/BENCHMARKS.md, "Quality"
    rerank: str = "detector"
    stop_at_newline: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("generation.max_new_tokens must be >= 1")
        if self.num_beams < 1:
            raise ConfigError("generation.num_beams must be >= 1")
        if not 1 <= self.num_return_sequences <= 16:
            raise ConfigError("generation.num_return_sequences must be in 1..16")
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise ConfigError(
                "generation.num_return_sequences > num_beams needs do_sample=true (greedy gives one answer)"
            )
        if not 0 <= self.word_coverage <= 1:
            raise ConfigError("generation.word_coverage must be in [0, 1]")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError("generation.temperature must be > 0 and top_p in (0, 1]")
        if self.repetition_penalty <= 0 or self.source_repetition_penalty <= 0:
            raise ConfigError("repetition penalties must be > 0 (1.0 disables)")
        if self.no_repeat_ngram_size < 0 or self.source_no_repeat_ngram_size < 0:
            raise ConfigError("generation.no_repeat_ngram_size and source_no_repeat_ngram_size must be >= 0")
        if not 0 <= self.prompt_lookup <= 16:
            raise ConfigError(f"generation.prompt_lookup must be in 0..16, got {self.prompt_lookup}")
        if self.cuda_graphs not in ("auto", "eager", "off"):
            raise ConfigError(f"generation.cuda_graphs must be auto, eager or off, got {self.cuda_graphs!r}")
        if self.rerank not in RERANK_METHODS:
            raise ConfigError(f"generation.rerank must be one of {RERANK_METHODS}, got {self.rerank!r}")
        if self.quantize not in QUANTIZE_METHODS:
            raise ConfigError(f"generation.quantize must be one of {QUANTIZE_METHODS}, got {self.quantize!r}")

    def with_candidates(self, k: int) -> GenerationConfig:
        """``k`` sampled candidates to rerank (temperature 0.8, top-p 0.95 unless this already samples);
        ``k`` = 1 leaves the config as it is."""
        if k <= 1:
            return self
        sampled = self.do_sample
        return dataclasses.replace(
            self, num_return_sequences=k, do_sample=True,
            temperature=self.temperature if sampled else 0.8, top_p=self.top_p if sampled else 0.95,
        )


@dataclass(frozen=True)
class RunConfig:
    """Everything `paraphrase-ray train` needs."""

    model: str = "smollm2-135m"
    prompt: PromptConfig = field(default_factory=PromptConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; an unknown key or a value of the wrong type raises
    ConfigError naming the key (``train.steps must be an integer, got 12.7``)."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or cls.__name__} must be a mapping, got {data!r}")
    data = dict(data or {})
    known = {f.name: f for f in fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        k = unknown[0]
        hint = difflib.get_close_matches(k, known, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else f" (known keys: {', '.join(known)})"
        raise ConfigError(f"unknown config key {where + k!r}{extra}")
    if "sources" in data and isinstance(data["sources"], str):
        data["sources"] = [data["sources"]]
    hints = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            kwargs[name] = from_dict(hints[name], value, where=f"{where}{name}.")
        else:
            kwargs[name] = check_value(hints[name], value, where + name)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a check __post_init__ could not make on a value the type check let through
        raise ConfigError(f"bad value in {where or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-JSON dict of a config (tuples become lists)."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a clear error for missing files and syntax errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a YAML mapping at the top level")
    return data


def replace_nested(cfg: T, overrides: dict[str, Any]) -> T:
    """Apply dotted overrides like {"train.lr": 0.1, "prompt.n_tokens": 8} to a frozen config tree."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        cfg = _replace_path(cfg, dotted.split("."), value, dotted)
    return cfg


def _replace_path(obj: Any, path: list[str], value: Any, dotted: str) -> Any:
    names = [f.name for f in fields(obj)]
    if path[0] not in names:
        hint = difflib.get_close_matches(path[0], names, n=1)
        raise ConfigError(f"unknown config key {dotted!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    if len(path) == 1:
        value = check_value(_field_types(type(obj))[path[0]], value, dotted)
        try:
            return dataclasses.replace(obj, **{path[0]: value})
        except TypeError as e:
            raise ConfigError(f"bad value for {dotted}: {e}") from e
    child = getattr(obj, path[0])
    return dataclasses.replace(obj, **{path[0]: _replace_path(child, path[1:], value, dotted)})

"""What the Serve application accepts: its settings (config ``args`` / CLI flags) and the HTTP schema.

No Ray here, so the config file's ``args`` and request bodies can be checked without a cluster.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

from paraphrase_ray.config import ZERO_SHOT  # reserved prompt name, the base model with no prompt
from paraphrase_ray.errors import ConfigError
from paraphrase_ray.evaluation.embedder import DEFAULT_EMBEDDER
from paraphrase_ray.prompt.directory import WEIGHTS_FILE
from paraphrase_ray.storage import is_uri, resolve_prompt_dir

ENV_API_KEY = "PARAPHRASE_RAY_API_KEY"
MAX_CANDIDATES = 8
MAX_SEED = 2**63 - 1  # torch generators take a 64-bit seed; keep to the signed range every backend accepts
PROMPT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # what parse_prompt_specs accepts (and "zero-shot")
# a served prompt's name, or a prompt directory's path relative to the prompt store (store.py): 1-16 such names
# joined by "/" (no segment starts with "." -- no "..", no hidden directories)
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
MODEL_NAME_PATTERN = rf"^{_SEGMENT}(/{_SEGMENT}){{0,15}}$"
MODEL_NAME_MAX = 255
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # what a server without an API key answers (any port)
# TEST ONLY, active only when ServeSettings.debug_stall_s > 0: a text holding a mark stalls its batch, fails its
# row's generation, or makes the model replica raise a plain exception (what a bug would do)
DEBUG_STALL_MARK, DEBUG_FAIL_MARK, DEBUG_RAISE_MARK = "[debug-stall]", "[debug-fail]", "[debug-raise]"
_NAME_RE = re.compile(PROMPT_NAME_PATTERN)


@dataclass(frozen=True)
class ServeSettings:
    """The application's ``args`` (serve/config.yaml) and the ``paraphrase-ray serve`` flags."""

    prompts: tuple[str, ...] = ()  # "[NAME=]DIR" entries (YAML: a NAME: DIR mapping); the first is default
    default: str | None = None  # name of the default prompt (default: the first)
    model: str | None = None  # base model (default: the one the default prompt records)
    precision: str | None = None  # auto | bf16 | fp32 (default: the prompt's training precision)
    device: str = "auto"  # auto | cpu | cuda: where the replica runs (Ray narrows CUDA to its GPU share)
    api_key: str | None = None  # prefer the PARAPHRASE_RAY_API_KEY environment variable to a key in a file
    max_texts: int = 64  # texts per request
    max_chars: int = 2000  # characters per text
    max_new_tokens: int = 128  # server cap on generated tokens per row
    max_batch_size: int = 32  # rows x candidates per forward pass
    batch_wait_timeout_s: float = 0.01  # least time the first row of a batch waits for company
    batch_wait_fraction: float = 0.1  # ...or this share of the last batch's duration (see _generate)
    batch_wait_max_s: float = 0.5  # ...but never longer than this
    embedder: str = DEFAULT_EMBEDDER  # rerank scorer
    # operations (issue 14): back-pressure, timeouts, health
    max_queued_rows: int = 256  # texts admitted and not yet answered, per replica; beyond: 503 + Retry-After
    # admission in work units (admission.py): a row costs its input tokens (prompt + source) plus candidates x
    # its max new tokens. One request over max_request_work: 413; the replica's queue over max_queued_work: 503
    max_request_work: int = 8192
    max_queued_work: int = 16384
    # Host headers a server without an API key answers besides loopback (LOOPBACK_HOSTS); "*": any (not advised)
    allowed_hosts: tuple[str, ...] = ()
    request_timeout_s: float | None = 60.0  # a request still waiting after this gets 504 (None: no limit)
    stuck_batch_s: float = 120.0  # check_health fails (Serve replaces the replica) if one batch runs longer
    # TEST ONLY: a batch holding a text that contains DEBUG_STALL_MARK sleeps this long in the generation thread,
    # so tests can stall a replica on purpose; > 0 also enables DEBUG_FAIL_MARK and DEBUG_RAISE_MARK. 0 (the
    # default) disables them all; never set it in production.
    debug_stall_s: float = 0.0
    # the prompt store (store.py): a directory or gs://BUCKET/prefix; every prompt directory under it is servable by
    # its relative path, loaded on first use into an LRU of prompt_cache_size prompts per replica
    prompt_store: str | None = None
    prompt_cache_size: int = 256

    def __post_init__(self) -> None:
        if not self.prompts and not (self.prompt_store and self.model):
            raise ConfigError(
                "serve needs at least one prompt directory (--prompt [NAME=]DIR, or args.prompts), or a prompt "
                "store with its base model (--prompt-store DIR --model NAME)"
            )
        if self.prompt_cache_size < 1:
            raise ConfigError(f"serve prompt_cache_size must be >= 1, got {self.prompt_cache_size}")
        if self.prompt_store is not None and not is_uri(self.prompt_store) and not Path(self.prompt_store).is_dir():
            raise ConfigError(f"prompt store {self.prompt_store!r} is not a directory (give a directory or gs://BUCKET/prefix)")
        for key in ("max_texts", "max_chars", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"serve {key} must be >= 1, got {getattr(self, key)}")
        if self.max_batch_size < MAX_CANDIDATES:
            raise ConfigError(f"serve max_batch_size must be >= {MAX_CANDIDATES} (one row's candidates)")
        if not 0 <= self.batch_wait_timeout_s <= self.batch_wait_max_s <= 5:
            raise ConfigError("serve needs 0 <= batch_wait_timeout_s <= batch_wait_max_s <= 5 (seconds)")
        if not 0 <= self.batch_wait_fraction <= 1:
            raise ConfigError("serve batch_wait_fraction must be in [0, 1]")
        if self.max_queued_rows < self.max_texts:
            raise ConfigError(
                f"serve max_queued_rows ({self.max_queued_rows}) must be >= max_texts ({self.max_texts})"
            )
        if not 1 <= self.max_request_work <= self.max_queued_work:
            raise ConfigError(
                f"serve needs 1 <= max_request_work ({self.max_request_work}) <= max_queued_work ({self.max_queued_work})"
            )
        if any(not h or len(h) > 253 or any(c in h for c in "/ ") for h in self.allowed_hosts):
            raise ConfigError(f"serve allowed_hosts must be host names (no scheme, path or port), got {self.allowed_hosts}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ConfigError("serve request_timeout_s must be > 0 (or null for no limit)")
        if self.stuck_batch_s <= 0 or self.debug_stall_s < 0:
            raise ConfigError("serve stuck_batch_s must be > 0 and debug_stall_s >= 0")
        if self.precision not in (None, "auto", "bf16", "fp32"):
            raise ConfigError(f"serve precision must be auto, bf16 or fp32, got {self.precision!r}")
        parse_prompt_specs(self.prompts, self.default)


def split_prompt_spec(spec: str) -> tuple[str, str]:
    """``[NAME=]DIR`` -> (name, dir); unnamed, the dir's last part names it (a URI's options hold '=' too)."""
    name, sep, path = str(spec).partition("=")
    if not sep or is_uri(name):
        return Path(str(spec).split("?")[0]).name, str(spec)
    return name, path


def parse_prompt_specs(specs: tuple[str, ...], default: str | None = None) -> list[tuple[str, Path]]:
    """``[NAME=]DIR`` entries -> [(name, absolute dir)] with the default first. Checks names and safetensors."""
    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, path = split_prompt_spec(spec)
        p = resolve_prompt_dir(path)  # a gs:// URI is fetched to this machine's cache first (storage.py)
        if not _NAME_RE.match(name):
            raise ConfigError(
                f"prompt name {name!r} must be 1-64 letters, digits, '_', '.' or '-': use NAME=DIR"
            )
        if name == ZERO_SHOT:
            raise ConfigError(
                f"prompt name {ZERO_SHOT!r} is reserved for the no-prompt baseline; pick another"
            )
        if name in dict(out):
            raise ConfigError(f"prompt name {name!r} is given twice; name them with NAME=DIR")
        if not (p / WEIGHTS_FILE).is_file():
            raise ConfigError(
                f"{p} is not a prompt directory (no {WEIGHTS_FILE}; pickles are never loaded)"
            )
        out.append((name, p))
    if default is not None:
        if default not in dict(out):
            raise ConfigError(f"default prompt {default!r} is not among {[n for n, _ in out]}")
        out.sort(key=lambda np_: np_[0] != default)
    return out


# -- HTTP schema -----------------------------------------------------------------------------------------------
class ParaphraseRequest(BaseModel):
    """Give ``text`` or ``texts``. Decoding options left out take the prompt's recorded defaults."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="one text (or use texts)")
    texts: list[str] | None = Field(None, description="several texts; answered in input order")
    prompt: str | None = Field(
        None,
        max_length=MODEL_NAME_MAX,
        pattern=MODEL_NAME_PATTERN,
        description=f"prompt name, or a path under the prompt store (default: the server's default; {ZERO_SHOT!r}: "
        "none); see GET /prompts",
    )
    num_candidates: int = Field(1, ge=1, le=MAX_CANDIDATES, description="candidates per text")
    do_sample: bool | None = Field(None, description="sample (default: only when num_candidates > num_beams)")
    # lower bounds keep logits finite: schemathesis found temperature=5e-324 turning them into inf / nan
    temperature: float | None = Field(None, ge=0.05, le=5)
    top_p: float | None = Field(None, gt=0, le=1)
    num_beams: int | None = Field(None, ge=1, le=MAX_CANDIDATES)
    repetition_penalty: float | None = Field(None, ge=0.1, le=5)
    source_repetition_penalty: float | None = Field(
        None, ge=0.1, le=5, description="penalty on the source's tokens"
    )
    source_no_repeat_ngram_size: int | None = Field(
        None, ge=0, le=16, description="never copy this many consecutive source tokens (0: off)"
    )
    max_new_tokens: int | None = Field(None, ge=1, description="at most the server cap (see GET /prompts)")
    # (OpenAPI's "maximum" is a float, 2^63 rounded: the description states the exact bound)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description=f"sampling seed, 0 to 2^63-1 = {MAX_SEED}")
    rerank: bool = Field(False, description="score candidates; the best non-copy comes first")


def request_model(s: ServeSettings) -> type[ParaphraseRequest]:
    """``ParaphraseRequest`` with this server's limits in the schema, so ``/openapi.json`` states what is enforced.

    Limits that depend on the tokenizer (source tokens, context) cannot be stated in JSON Schema and stay in
    ``policy``; ``GET /prompts`` lists them.
    """
    text = Annotated[str, StringConstraints(min_length=1, max_length=s.max_chars, pattern=r"\S")]
    return create_model(
        "ParaphraseRequest",
        __base__=ParaphraseRequest,
        __doc__=ParaphraseRequest.__doc__,
        text=(text | None, Field(None, description="one text (or use texts); not only whitespace")),
        texts=(
            list[text] | None,
            Field(None, min_length=1, max_length=s.max_texts, description="several texts; answered in input order"),
        ),
        max_new_tokens=(int | None, Field(None, ge=1, le=s.max_new_tokens, description="at most the server cap")),
    )


class CandidateScore(BaseModel):
    adequacy: float
    self_bleu: float
    objective: float  # BERT-iBLEU, halved when not faithful (see evaluation/metrics.py)
    copy_: bool = Field(alias="copy")
    faithful: bool = True
    invented: list[str] = Field(default_factory=list, description="names / numbers the source lacks")
    dropped: list[str] = Field(default_factory=list, description="source numbers left out")

    model_config = ConfigDict(populate_by_name=True)


class ParaphraseResult(BaseModel):
    text: str
    paraphrase: str  # = candidates[0]
    candidates: list[str]
    scores: list[CandidateScore] | None = None  # aligned with candidates, with rerank only


class ParaphraseResponse(BaseModel):
    prompt: str
    model: str
    results: list[ParaphraseResult]

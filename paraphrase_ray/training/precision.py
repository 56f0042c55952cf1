"""Which precision a training run's frozen weights use, decided by measurement, and the weights it trains on.

``train.precision: auto`` on CPU runs a GEMM probe once per process and shape (``probe``): the training
step's largest matmul, ``(rows x positions) x d_model`` times ``d_model x d_ff``, forward (``x @ W.T``) and
input-gradient (``g @ W``) layouts, fp32 against bf16, best of 3 after a warm-up. bf16 is used when it is at
least ``MIN_SPEEDUP`` (1.5x) faster. Why 1.5x: matmuls are ~3/4 of an fp32 step; a 1.5x GEMM gain is at most
a ~1.3x step gain, less the casts bf16 adds, and a probe on a busy machine varies by ~20%, so a smaller
threshold would flip between runs for no gain. CPUs without bf16 matrix units (AVX2) run bf16 at ~1/400 of
fp32 and CPUs whose AVX512-BF16 is slow (measured: 0.6x fp32) stay fp32; AMX / fast AVX512-BF16 CPUs (3-4x)
take bf16. A bf16 probe on 8 rows runs first, so a CPU where bf16 crawls costs milliseconds, not seconds.
``$PARAPHRASE_RAY_BF16_MIN_SPEEDUP`` overrides the threshold (0: bf16 whatever the probe says; a large
number: fp32); the probe still runs and is recorded. Shapes too small to pay (below ``MIN_PROBE_FLOP``: tiny
test models) stay fp32 unless that variable is set.

What bf16 means here (``Bf16Linear``): every frozen ``nn.Linear`` (decoder projections, the output head)
holds its weight once in bf16 and computes ``linear(x.bf16(), W_bf16).float()``; activations, norms,
attention (sdpa), the residual stream, the prompt, AdamW and the loss stay fp32. On the CPU profiled bf16
attention and norms were measured slower than fp32 (attention backward 4.5x, the non-matmul part of the step
1.7x fp32 with every activation in bf16, 1.34x with bf16 matmuls only; docs/BENCHMARKS.md), and fp32
activations keep the loss close to the fp32 run's.

One copy per purpose: the loaded model keeps its exact fp32 weights for generation (the low-bit kernel
rebuilds its Q4_1/Q8_0 blocks from them, and prefill runs on them); training runs on a shallow copy of the
module tree (``models.replaced_copy``) whose Linear layers hold the bf16 weights, sharing embeddings and
norms, built once per process and model. A process that only trains (``LoadedModel.train_only``: the
``train`` command) swaps the bf16 Linear layers into the model itself, so no fp32 Linear weight is kept.
A model loaded in bf16 (``precision: bf16`` through ``load_model``, CUDA's default) trains as it is.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from paraphrase_ray.errors import ConfigError
from paraphrase_ray.models import LoadedModel, replaced_copy, resolve_device

log = logging.getLogger("paraphrase_ray")

MIN_SPEEDUP = 1.5  # bf16 GEMM / fp32 GEMM speed at the training shape for ``auto`` to train in bf16
MIN_SPEEDUP_ENV = "PARAPHRASE_RAY_BF16_MIN_SPEEDUP"
MIN_PROBE_FLOP = 1e8  # a GEMM smaller than this cannot gain anything worth a bf16 copy (tiny test models)
MAX_PROBE_ROWS = 512  # the probe's rows are capped (the GEMM rate hardly changes above) and rounded to 64s
PREPROBE_ROWS = 8

_LOCK = threading.Lock()
_PROBES: dict[tuple[int, int, int, int], Probe] = {}
_COPIES: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Probe:
    """One GEMM probe: ms per (forward + input-gradient) GEMM pair in fp32 and in bf16 at one shape."""

    rows: int
    d_model: int
    d_ff: int
    threads: int
    fp32_ms: float
    bf16_ms: float
    probe_ms: float  # what the probe itself cost

    @property
    def speedup(self) -> float:
        return self.fp32_ms / self.bf16_ms if self.bf16_ms > 0 else 0.0

    def record(self) -> dict[str, Any]:
        return {"rows": self.rows, "d_model": self.d_model, "d_ff": self.d_ff, "threads": self.threads,
                "fp32_ms": round(self.fp32_ms, 3), "bf16_ms": round(self.bf16_ms, 3),
                "speedup": round(self.speedup, 2), "probe_ms": round(self.probe_ms, 1)}


@dataclass(frozen=True)
class Precision:
    """What a training run's frozen weights ran in, and why (``label``: ``bf16 (probe: 3.6x fp32)``)."""

    dtype: str  # "bf16" | "fp32"
    why: str
    probe: Probe | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

    @property
    def label(self) -> str:
        return f"{self.dtype} ({self.why})"

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "why": self.why, "label": self.label}
        if self.probe is not None:
            out["probe"] = self.probe.record()
        return out


def model_dims(model: nn.Module) -> tuple[int, int]:
    """(d_model, d_ff) of a causal LM: its MLP's input and hidden widths."""
    cfg = model.config
    d = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "d_model", 0) or model.get_input_embeddings().embedding_dim)
    ff = getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or getattr(cfg, "n_inner", None)
    return d, int(ff or 4 * d)


def _pair_ms(fp32: tuple, bf16: tuple, reps: int) -> tuple[float, float]:
    """Best ms of ``reps`` runs of the forward (x @ W.T) and input-gradient (g @ W) GEMMs in each dtype, after a
    warm-up, the two dtypes alternating (a busy machine slows both alike)."""
    best = [float("inf"), float("inf")]
    for i in range(reps + 1):
        for j, (x, w, g) in enumerate((fp32, bf16)):
            t = time.perf_counter()
            F.linear(x, w)
            torch.mm(g, w)
            if i:
                best[j] = min(best[j], 1e3 * (time.perf_counter() - t))
    return best[0], best[1]


def probe(rows: int, d_model: int, d_ff: int, reps: int = 3) -> Probe:
    """fp32 vs bf16 at ``(rows x d_model) @ (d_model x d_ff)``, cached per process, shape and thread count.

    Inputs come from a private generator: the global RNG (seeded by ``train``) is untouched."""
    rows = max(64, min(64 * round(rows / 64), MAX_PROBE_ROWS))  # nearby shapes (trials) share one probe
    key = (rows, d_model, d_ff, torch.get_num_threads())
    with _LOCK:
        if key in _PROBES:
            return _PROBES[key]
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(0)
        x, w, g = (torch.randn(*s, generator=gen) for s in ((rows, d_model), (d_ff, d_model), (rows, d_ff)))
        xb, wb, gb = (t.to(torch.bfloat16) for t in (x, w, g))
        n = PREPROBE_ROWS
        fp32_ms, bf16_ms = _pair_ms((x[:n], w, g[:n]), (xb[:n], wb, gb[:n]), 1)
        if rows > n and bf16_ms < 4 * fp32_ms:  # bf16 does not crawl: measure the real shape
            fp32_ms, bf16_ms = _pair_ms((x, w, g), (xb, wb, gb), reps)
        # else bf16 crawls (no bf16 units: ~1/400 of fp32) or the shape is this small: the small probe decides
        result = Probe(rows, d_model, d_ff, key[3], fp32_ms, bf16_ms, 1e3 * (time.perf_counter() - t0))
        _PROBES[key] = result
    log.info("bf16 probe at %dx%dx%d, %d thread(s): fp32 %.2f ms, bf16 %.2f ms (%.2fx)", rows, d_model, d_ff,
             result.threads, fp32_ms, bf16_ms, result.speedup)
    return result


def load_precision(precision: str, device: str) -> str:
    """The precision a training process loads its base model in: on CPU the exact fp32 weights whatever
    ``precision`` asks (training takes its bf16 copy of them, generation needs them), elsewhere ``precision``."""
    return "fp32" if resolve_device(device).type == "cpu" else precision


def min_speedup() -> tuple[float, bool]:
    """(threshold, whether ``$PARAPHRASE_RAY_BF16_MIN_SPEEDUP`` set it)."""
    raw = os.environ.get(MIN_SPEEDUP_ENV, "").strip()
    if not raw:
        return MIN_SPEEDUP, False
    try:
        return float(raw), True
    except ValueError:
        raise ConfigError(f"${MIN_SPEEDUP_ENV} must be a number (the bf16/fp32 speed ratio), got {raw!r}") from None


def decide(
    loaded: LoadedModel, precision: str, rows: int, threshold: float | None = None
) -> Precision:
    """The training precision for ``precision`` (auto | bf16 | fp32) on ``loaded`` at ``rows`` GEMM rows.

    ``threshold`` (default: ``min_speedup()``) is the bf16/fp32 speed ratio ``auto`` needs."""
    if loaded.dtype != torch.float32:  # loaded in bf16 (asked for, or CUDA's auto): trains as it is
        name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(loaded.dtype, str(loaded.dtype))
        return Precision(name, f"model loaded in {name}")
    if precision in ("fp32", "bf16"):
        return Precision(precision, "asked")
    if loaded.device.type != "cpu":  # an fp32 model on a GPU that lacks bf16
        return Precision("fp32", f"{loaded.device.type} without bf16")
    forced = threshold is not None
    if threshold is None:
        threshold, forced = min_speedup()
    d, ff = model_dims(loaded.model)
    if not forced and 2 * min(rows, MAX_PROBE_ROWS) * d * ff < MIN_PROBE_FLOP:
        return Precision("fp32", f"{rows}x{d}x{ff} GEMMs too small for bf16 to pay")
    p = probe(rows, d, ff)
    use = p.speedup >= threshold
    why = f"probe: {p.speedup:.2f}x fp32" + (f", threshold {threshold:g}x" if forced else "")
    return Precision("bf16" if use else "fp32", why, p)


class Bf16Linear(nn.Module):
    """A frozen Linear for training with its weight (and bias) held once in bf16: fp32 in, fp32 out, the GEMM
    in bf16 (fp32 accumulation inside the kernel). ``weight`` is the bf16 tensor (a buffer: it never trains)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().to(torch.bfloat16), persistent=False)
        bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 weights"


def _linears(model: nn.Module) -> dict[int, nn.Linear]:
    return {id(m): m for m in model.modules() if type(m) is nn.Linear}


def training_module(loaded: LoadedModel, decision: Precision) -> nn.Module:
    """The module a training step runs for ``decision``: ``loaded.model`` itself for fp32 (or a model loaded in
    bf16), else its bf16 training copy (built once per process and model). With ``loaded.train_only`` the bf16
    Linear layers replace the fp32 ones in ``loaded.model`` itself: nothing generates from it, so its fp32
    Linear weights are not kept."""
    model = loaded.model
    if decision.dtype != "bf16" or loaded.dtype != torch.float32:
        return model
    with _LOCK:
        if model in _COPIES:
            return _COPIES[model]
        linears = _linears(model)
        if not linears:  # already swapped in place (a train_only model trained before), or no Linear at all
            return model
        new = {i: Bf16Linear(lin) for i, lin in linears.items()}
        if loaded.train_only:
            _swap_in_place(model, new)
            return model
        twin = replaced_copy(model, new)
        _COPIES[model] = twin
        return twin


def _swap_in_place(model: nn.Module, new: dict[int, nn.Module]) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in new:
                parent._modules[name] = new[id(child)]

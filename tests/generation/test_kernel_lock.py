"""A kernel build that was killed (or one still running) never hangs generation: issue 24.

torch's ``cpp_extension`` serialises builds with a ``lock`` file in the build directory and waits for it with no
timeout; a first build killed mid-compile leaves it behind, and every later process hung in generation, holding
the generation locks. Each case runs ``paraphrase-ray paraphrase`` in a fresh process on a tiny Llama whose weights
are exact Q4_1 / Q8_0 blocks (so generation asks for the kernel), with a temp ``$PARAPHRASE_RAY_CACHE``, and must
answer within 60 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from paraphrase_ray.generation.backends import lowbit as quant

ANSWER_S = 60
CLI = "import sys; from paraphrase_ray.cli.main import main; sys.exit(main(sys.argv[1:]))"
HOLD = (  # holds the build lock as a live build would, until killed
    "import sys, time; from paraphrase_ray.files import exclusive_lock\n"
    "with exclusive_lock(sys.argv[1], 5):\n    print('held', flush=True); time.sleep(600)\n"
)


@pytest.fixture(scope="module")
def built_kernel() -> Path:
    """The build directory of the kernel in the real cache (built once, if this machine can)."""
    mod = quant.load_kernels()
    if mod is None:
        pytest.skip(f"low-bit kernel unavailable here: {quant.kernel_error()}")
    return Path(mod.__file__).parent


@pytest.fixture(scope="module")
def q4_prompt(tmp_path_factory) -> Path:
    """A prompt directory on a tiny Llama whose Linear weights are Q4_1 blocks and its embedding Q8_0."""
    from conftest import build_tiny_tokenizer
    from test_lowbit import round_to_blocks
    from transformers import LlamaConfig, LlamaForCausalLM

    from paraphrase_ray.config import PromptConfig, RunConfig
    from paraphrase_ray.prompt.directory import PromptMeta
    from paraphrase_ray.prompt.soft_prompt import SoftPrompt

    root = tmp_path_factory.mktemp("q4-llama")
    tok = build_tiny_tokenizer(root / "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.2,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    round_to_blocks(model)
    model.save_pretrained(root / "model")
    prompt = SoftPrompt.init(model, tok, PromptConfig(n_tokens=4, init="vocab", seed=1))
    prompt.save(root / "prompt", str(root / "model"), model, PromptMeta.record(RunConfig(model=str(root / "model"))))
    return root / "prompt"


def _paraphrase(prompt: Path, cache: Path, tmp_path: Path, **env: str) -> tuple[dict, str, float]:
    """(stats, stderr, seconds) of one ``paraphrase --text`` in a fresh process; fails past ANSWER_S."""
    stats = tmp_path / "stats.json"
    cmd = [sys.executable, "-c", CLI, "paraphrase", "--prompt", str(prompt), "--text", "Snow fell all night.",
           "--num-candidates", "1", "--max-new-tokens", "4", "--device", "cpu", "--stats", str(stats)]
    full_env = {**os.environ, "PARAPHRASE_RAY_CACHE": str(cache), "HF_HUB_OFFLINE": "1", **env}
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=ANSWER_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"generation did not answer within {ANSWER_S} s (hung on the build lock?): {e.stderr}")
    seconds = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\n"), done.stderr  # the (tiny, random) model's paraphrase was printed
    return json.loads(stats.read_text()), done.stderr, seconds


def test_a_killed_builds_lock_beside_a_built_kernel_is_cleared(built_kernel, q4_prompt, tmp_path):
    """Killed after linking (or a build killed while another finished): the library is used, nothing waits."""
    build_dir = tmp_path / "cache" / "ext" / built_kernel.name
    shutil.copytree(built_kernel, build_dir)  # its .ninja_log lists the linked library
    (build_dir / "lock").touch()  # what torch's FileBaton leaves when its holder is killed
    stats, err, _ = _paraphrase(q4_prompt, tmp_path / "cache", tmp_path)
    assert stats["path"].startswith("q4"), err
    assert "left by a killed kernel build" in err
    assert not (build_dir / "lock").exists()


def test_a_killed_first_build_is_started_afresh_and_a_failed_build_falls_back(built_kernel, q4_prompt, tmp_path):
    """Killed mid-compile (no library yet): the directory is cleared and built again; a build that then fails
    (here: a compiler that always fails) falls back to the exact fp32 path with a warning."""
    build_dir = tmp_path / "cache" / "ext" / built_kernel.name
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()
    (build_dir / "lowbit_linear.o").write_bytes(b"\x7fELF half an object file")
    stats, err, _ = _paraphrase(q4_prompt, tmp_path / "cache", tmp_path, CXX=shutil.which("false") or "false")
    assert stats["path"].startswith("fp32"), err
    assert "left by a killed kernel build" in err and "low-bit kernel unavailable" in err
    assert not (build_dir / "lowbit_linear.o").exists()  # the killed build's half file went with its directory


def test_a_live_build_is_waited_for_a_bounded_time_then_generation_falls_back(built_kernel, q4_prompt, tmp_path):
    build_dir = tmp_path / "cache" / "ext" / built_kernel.name
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(build_dir.with_name(f"{build_dir.name}.lock"))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        stats, err, seconds = _paraphrase(q4_prompt, tmp_path / "cache", tmp_path, **{quant.KERNEL_WAIT_ENV: "2"})
    finally:
        holder.kill()
        holder.wait()
    assert stats["path"].startswith("fp32"), err
    assert "TimeoutError" in err and "low-bit kernel unavailable" in err
    assert (build_dir / "lock").exists()  # the live build's own lock is left to it

"""benchmarks/gpu_suite.sh: its plumbing on CPU (the GPU numbers need a lent GPU; docs/BENCHMARKS.md says which)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"


def _commands(*args: str) -> dict[str, list[str]]:
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, check=True).stdout
    steps = {}
    for line in out.splitlines():
        head, _, cmd = line.partition(": ")
        steps[head.split()[1]] = shlex.split(cmd)
    return steps


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_every_step_names_a_real_script_and_space(device):
    steps = _commands("--device", device)
    assert list(steps) == ["train", "generate", "sweep", "serve"]
    for name, cmd in steps.items():
        target = next(a for a in cmd[1:] if a.endswith(".py") or a == "paraphrase_ray.cli.main")
        assert target == "paraphrase_ray.cli.main" or (ROOT / target).is_file(), (name, target)
        if name != "sweep":  # the sweep runs where its space's resources say
            assert cmd[cmd.index("--device") + 1] == device
    space = steps["sweep"][steps["sweep"].index("--space") + 1]
    assert (ROOT / space).is_file()
    # the serve step serves what the sweep step exports
    storage = steps["sweep"][steps["sweep"].index("--storage") + 1]
    sweep_name = steps["sweep"][steps["sweep"].index("--name") + 1]
    assert f"best={storage}/{sweep_name}/best" in steps["serve"]


def test_the_gpu_sweep_space_packs_four_trials_on_one_gpu():
    from paraphrase_ray.sweep.spec import load_spec

    spec = load_spec(ROOT / "search_spaces" / "gpu_suite.yaml")
    assert spec.resources.gpu == 0.25 and spec.num_samples == 4 and spec.max_concurrent_trials == 4
    assert spec.run.model == "smollm2-135m"  # a lent GPU machine reaches no model hub


def test_bad_arguments_are_refused():
    r = subprocess.run(["bash", str(SCRIPT), "--device", "tpu"], capture_output=True, text=True)
    assert r.returncode == 2 and "--device must be cpu or cuda" in r.stderr
    r = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown argument --bogus" in r.stderr

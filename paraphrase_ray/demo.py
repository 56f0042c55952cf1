"""`make demo`: the whole product on the embedded offline defaults, end to end.

1. quickstart sweep (search_spaces/quickstart.yaml) on smollm2-135m: leaderboard, plot, best prompt export
2. paraphrase a few sentences with the best prompt (offline path)
3. deploy the best prompt with Ray Serve, send requests over HTTP, print the answers, shut down

Safe to re-run: a finished sweep of the same name is reloaded (``--resume``) instead of trained again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

SENTENCES = [
    "The weather was so cold that the lake froze overnight.",
    "The company reported higher profits than analysts had expected.",
    "She finished the marathon despite a painful knee injury.",
]


def cli_main(args: list[str]) -> int:
    """Each step in its own process: Tune's and Serve's Ray sessions never share state."""
    return subprocess.call([sys.executable, "-m", "paraphrase_ray.cli", *args])


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run(storage: str = "runs/sweeps", name: str = "quickstart") -> int:
    from ray import tune

    t0 = time.perf_counter()
    space = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"
    sweep_dir = Path(storage) / name
    _banner(f"1/3 quickstart sweep -> {sweep_dir}")
    args = ["tune", "--space", str(space), "--name", name, "--storage", storage]
    if sweep_dir.is_dir() and tune.Tuner.can_restore(str(sweep_dir.resolve())):
        args.append("--resume")  # Tune saved state: reload (finished trials are not re-run)
    rc = cli_main(args)
    if rc != 0:
        return rc
    best = sweep_dir / "best"
    if not (best / "adapter_model.safetensors").is_file():
        print(f"error: the sweep exported no best prompt in {best}", file=sys.stderr)
        return 1
    print(f"plot: {sweep_dir / 'sweep.png'}\nleaderboard: {sweep_dir / 'leaderboard.csv'}")

    _banner("2/3 paraphrases from the best prompt (offline)")
    inp = sweep_dir / "demo_input.jsonl"
    inp.write_text("".join(json.dumps({"source": s}) + "\n" for s in SENTENCES))
    out = sweep_dir / "demo_output.jsonl"
    rc = cli_main(["paraphrase", "--prompt", str(best), "--input", str(inp), "--output", str(out)])
    if rc != 0:
        return rc
    for line in out.read_text().splitlines():
        row = json.loads(line)
        print(f"  {row['source']}\n    -> {row['prediction']}")

    _banner("3/3 Ray Serve over HTTP")
    rc = subprocess.call([sys.executable, "-m", "paraphrase_ray.serve_runner", "--demo", f"best={best}"])
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(run())

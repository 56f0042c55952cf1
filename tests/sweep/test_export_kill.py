"""A sweep's ``best/`` and its JSON files survive a writer killed halfway (issue 24).

``best/`` used to be deleted, then written file by file, so a replica restarting in between loaded half a prompt.
Now it is swapped in whole on a local disk, and in a bucket (no atomic rename) a manifest written last says which
files are complete: ``resolve_prompt_dir`` takes only a copy that matches it.
"""

from __future__ import annotations

import json

import pytest
import torch
from kill_helpers import kill_when_paused, run_script

from paraphrase_ray.errors import ConfigError, PromptFileError
from paraphrase_ray.prompt.directory import PROMPT_FILES, read_meta
from paraphrase_ray.prompt.soft_prompt import SoftPrompt
from paraphrase_ray.sweep.spec import SweepStorage

EXPORT = '''
from types import SimpleNamespace
import torch
from ray import tune
import paraphrase_ray.storage as storage
from paraphrase_ray.prompt.directory import META_FILE
from paraphrase_ray.prompt.soft_prompt import SoftPrompt
from paraphrase_ray.sweep.driver import export_best
from paraphrase_ray.sweep.spec import ParamSpec, SweepSpec, SweepStorage

where, work, seed, hook = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "pause"
if hook:  # pause when best/'s paraphrase_ray.json is written: its adapter config and weights come first
    SweepStorage.write_bytes = pausing(SweepStorage.write_bytes, lambda self, rel, *a: rel.endswith(META_FILE))
    Path.write_bytes = pausing(Path.write_bytes, lambda p, *a: p.name == META_FILE and ".best.tmp-" in str(p))
    if hasattr(storage, "_put"):
        storage._put = pausing(storage._put, lambda fs, path, *a: path.endswith(META_FILE))
trial = work / f"trial-{seed}"
torch.manual_seed(seed)
SoftPrompt(torch.randn(4, 16)).save(trial, "base", meta={"metrics": {}})
result = SimpleNamespace(metrics={"trial_id": f"t{seed}"}, path=str(trial),
                         best_checkpoints=[(tune.Checkpoint.from_directory(str(trial)), {"objective": 0.5, "step": 4})])
rows = [{"trial_id": f"t{seed}", "status": "completed", "objective": 0.5, "train.lr": 0.05}]
spec = SweepSpec(search={"train.lr": ParamSpec(type="float", low=0.01, high=0.1)})
assert export_best(SweepStorage.parse(where, "s"), [result], spec, rows, []) is not None
'''


def weights(seed: int) -> list:
    torch.manual_seed(seed)
    return torch.randn(4, 16).tolist()


def which_export(prompt_dir) -> int:
    """The seed of the export that ``prompt_dir`` holds whole; fails on a mix (weights of one, meta of another)."""
    w = SoftPrompt.load(prompt_dir).weight.tolist()
    trial = read_meta(prompt_dir).get("trial_id")
    whole = [seed for seed in (1, 2) if w == weights(seed) and trial == f"t{seed}"]
    assert whole, f"{prompt_dir} loads as a prompt but is neither export (trial {trial!r})"
    assert sorted(p.name for p in prompt_dir.iterdir() if p.name != ".manifest.json") == sorted(PROMPT_FILES)
    return whole[0]


def test_killing_the_best_export_on_a_local_disk_leaves_the_previous_best(tmp_path):
    root = tmp_path / "runs"
    run_script(EXPORT, str(root), str(tmp_path), "1", "go", tmp_path=tmp_path)
    best = root / "s" / "best"
    assert which_export(best) == 1
    kill_when_paused(EXPORT, str(root), str(tmp_path), "2", "pause", tmp_path=tmp_path)
    assert which_export(best) == 1  # killed before the swap: the previous best, whole
    run_script(EXPORT, str(root), str(tmp_path), "2", "go", tmp_path=tmp_path)
    assert which_export(best) == 2
    assert sorted(p.name for p in (root / "s").iterdir()) == ["best"]  # the killed export's copy is gone


def test_killing_the_best_export_to_a_bucket_never_serves_a_mix(tmp_path, monkeypatch):
    from gcs_emulator import GcsEmulator

    import paraphrase_ray.storage as storage
    from paraphrase_ray.storage import resolve_prompt_dir

    monkeypatch.setenv("PARAPHRASE_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(storage, "FETCH_RETRY_S", 0.1, raising=False)
    with GcsEmulator(bucket="sweeps", log=tmp_path / "emulator.log") as gcs:
        root = gcs.uri("runs")
        best = SweepStorage.parse(root, "s").display("best")
        run_script(EXPORT, root, str(tmp_path), "1", "go", tmp_path=tmp_path)
        assert which_export(resolve_prompt_dir(best)) == 1
        kill_when_paused(EXPORT, root, str(tmp_path), "2", "pause", tmp_path=tmp_path)
        try:
            fetched = which_export(resolve_prompt_dir(best))
        except PromptFileError as e:  # what a replica starting now gets: the reason, never half a prompt
            assert "is incomplete" in str(e) and "being written" in str(e)
            fetched = None
        assert fetched in (None, 1, 2)
        assert which_export(tmp_path / "cache" / "prompts" / storage.prompt_cache_key(best)) == 1  # cache kept
        run_script(EXPORT, root, str(tmp_path), "2", "go", tmp_path=tmp_path)
        assert which_export(resolve_prompt_dir(best)) == 2
        assert sorted(gcs.listing("runs/s/best")) == sorted([*PROMPT_FILES, storage.MANIFEST_FILE])


def test_damaged_sweep_files_are_named_not_a_crash(tmp_path, caplog):
    """A truncated zero_shot.json (older versions truncated, then wrote) is computed again; a damaged
    space.yaml, which cannot be recomputed, is a ConfigError naming it."""
    store = SweepStorage.parse(str(tmp_path / "runs"), "s")
    store.write_bytes("zero_shot.json", json.dumps([{"system": "zero-shot", "objective": 0.1}]).encode())
    assert store.read_json("zero_shot.json") == [{"system": "zero-shot", "objective": 0.1}]
    (tmp_path / "runs" / "s" / "zero_shot.json").write_text('[{"system": "zero-sh')
    with caplog.at_level("WARNING", logger="paraphrase_ray"):
        assert store.read_json("zero_shot.json") is None
    assert "zero_shot.json is truncated or not JSON" in caplog.text
    assert store.read_json("missing.json") is None
    (tmp_path / "runs" / "s" / "space.yaml").write_text("run:\n  model: x\nsearch: {train.lr: {type: float, lo")
    with pytest.raises(ConfigError, match="space.yaml is truncated or not a YAML mapping"):
        store.read_yaml("space.yaml")

"""The crash-safe write helper every writer uses (files.py) and the output / manifest checks (storage.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paraphrase_ray.errors import ConfigError
from paraphrase_ray.files import (
    atomic_write,
    atomic_write_text,
    exclusive_lock,
    publish_dir,
    remove_stale_temps,
    temp_sibling,
    write_json,
)
from paraphrase_ray.storage import MANIFEST_FILE, check_output, manifest, manifest_problem


def test_atomic_write_leaves_no_temp_on_error_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "zero_shot.json"
    write_json(target, [{"system": "zero-shot"}])

    def half_then_fail(tmp):
        tmp.write_text('[{"sys')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text().startswith('[\n  {\n    "system"')  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zero_shot.json"]  # no temp left behind


def test_two_writers_of_one_file_never_share_a_temp(tmp_path):
    """A fixed temp name let one writer rename (or truncate) the other's half-written file."""
    target, seen = tmp_path / "f.txt", []

    def outer(tmp):
        seen.append(tmp)
        tmp.write_text("outer")
        atomic_write(target, lambda inner: (seen.append(inner), inner.write_text("inner")))  # writes meanwhile
        assert tmp.read_text() == "outer"

    atomic_write(target, outer)
    assert seen[0] != seen[1] and all(p.parent == tmp_path for p in seen)
    assert target.read_text() == "outer"


def test_temps_of_killed_writers_are_removed_by_the_next_writer(tmp_path):
    target = tmp_path / "leaderboard.csv"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    mine = temp_sibling(target)
    stale = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{dead_pid}-"))
    stale.write_text("half")
    (tmp_path / f".{target.name}.tmp-otherhost-1-abcd").write_text("another machine's: left alone")
    mine.write_text("a live writer's (this process): left alone")
    atomic_write_text(target, "a,b\n")
    assert not stale.exists() and mine.exists() and (tmp_path / f".{target.name}.tmp-otherhost-1-abcd").exists()
    assert remove_stale_temps(target) == []


def test_publish_dir_swaps_a_whole_directory_and_keeps_the_old_one_on_error(tmp_path):
    best = tmp_path / "best"
    publish_dir(best, lambda d: [(d / n).write_text(f"old {n}") for n in ("a", "b")])
    seen_name = []

    def fail_halfway(d):
        seen_name.append(d.name)
        (d / "a").write_text("new a")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        publish_dir(best, fail_halfway)
    assert seen_name == ["best"]  # filled under its own name (a model card records its directory's name)
    assert {p.name: p.read_text() for p in best.iterdir()} == {"a": "old a", "b": "old b"}
    publish_dir(best, lambda d: (d / "c").write_text("new c"))
    assert {p.name: p.read_text() for p in best.iterdir()} == {"c": "new c"}  # replaced whole: no stale a, b
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    publish_dir(best, lambda d: (d / "d").write_text("second writer"), replace=False)  # first writer wins
    assert [p.name for p in best.iterdir()] == ["c"]


def test_exclusive_lock_waits_a_bounded_time_and_dies_with_its_holder(tmp_path):
    lock = tmp_path / "build.lock"
    hold = ("import sys, time; from paraphrase_ray.files import exclusive_lock\n"
            "with exclusive_lock(sys.argv[1], 5):\n    print('held', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="build.lock"):
            with exclusive_lock(lock, 0.5):
                pass
        assert time.monotonic() - t0 < 5
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file stays, the OS drops the lock
        holder.wait()
    assert lock.exists()
    with exclusive_lock(lock, 5):
        pass


def test_check_output_refuses_what_it_did_not_write_and_its_own_input(tmp_path):
    (tmp_path / "empty").mkdir()
    check_output(str(tmp_path / "new"))
    check_output(str(tmp_path / "empty"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.jsonl").write_text('{"source": "x"}\n')
    with pytest.raises(ConfigError, match="already exists and is not empty: pass --overwrite"):
        check_output(str(tmp_path / "data"))
    check_output(str(tmp_path / "data"), overwrite=True)
    for out in (tmp_path / "data", tmp_path, tmp_path / "data" / "in.jsonl"):  # holds it, a parent, the same file
        with pytest.raises(ConfigError, match="holds the input"):
            check_output(str(out), [str(tmp_path / "data" / "in.jsonl")], overwrite=True)
    check_output(str(tmp_path / "data" / "out"), [str(tmp_path / "data" / "in.jsonl")])  # beside it is fine


def test_a_fetched_copy_is_used_only_when_it_matches_its_manifest(tmp_path):
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"weights"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert manifest_problem(tmp_path) is None  # no manifest: a directory not published by a sweep
    (tmp_path / MANIFEST_FILE).write_bytes(b'{"complete": false}')
    assert "being written" in manifest_problem(tmp_path)
    (tmp_path / MANIFEST_FILE).write_bytes(manifest(files))
    (tmp_path / "README.md").write_text("a killed writer's leftover")
    assert manifest_problem(tmp_path) is None and not (tmp_path / "README.md").exists()
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights of the next export")
    assert "does not match" in manifest_problem(tmp_path)


def test_the_gguf_conversion_leaves_nothing_behind_when_it_fails_or_was_killed(tmp_path, monkeypatch):
    """The offline alias's first load converts ~0.5 GB; a failed conversion leaves nothing, and the temp of one
    that was killed (no cleanup ran) is removed by the next conversion, which publishes its copy whole."""
    import transformers

    from paraphrase_ray import models

    monkeypatch.setenv("PARAPHRASE_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_gguf_location", lambda alias: (tmp_path, "model.gguf"))
    target = tmp_path / "cache" / "models" / "smollm2-135m"

    class Fake:
        config = object()

        def save_pretrained(self, d):
            (Path(d) / "config.json").write_text("{}")
            (Path(d) / "model.safetensors").write_bytes(b"w" * 1000)

    def fails(*a, **k):
        raise OSError("out of memory while dequantizing")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fails)
    with pytest.raises(OSError, match="dequantizing"):
        models._offline_model_dir("smollm2-135m")
    assert list(target.parent.iterdir()) == []
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    killed = temp_sibling(target)
    killed = killed.with_name(killed.name.replace(f"-{os.getpid()}-", f"-{dead}-")) / target.name
    killed.mkdir(parents=True)
    (killed / "model.safetensors").write_bytes(b"half of 0.5 GB")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: Fake())
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Fake())
    assert models._offline_model_dir("smollm2-135m") == target
    assert [p.name for p in target.parent.iterdir()] == ["smollm2-135m"]  # the killed conversion's temp is gone
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]

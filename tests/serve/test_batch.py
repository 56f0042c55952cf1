"""Files at scale: Parquet in and out in-process, and the same generation through Ray Data on a real local Ray."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from paraphrase_ray.cli.main import main
from paraphrase_ray.config import PromptConfig, RunConfig
from paraphrase_ray.errors import ConfigError
from paraphrase_ray.prompt.directory import PromptMeta
from paraphrase_ray.prompt.soft_prompt import SoftPrompt

ROWS = [
    {"id": 1, "source": "The bank raised its rates again."},
    {"id": 2, "source": "Snow fell all night long."},
    {"id": 3, "source": "He sold the old car to a neighbour."},
    {"id": 4, "source": "The meeting was moved to Friday."},
    {"id": 5, "source": "Prices rose by 3 percent in May."},
]


@pytest.fixture()
def prompt_dir(tiny, tiny_model_dir, tmp_path):
    sp = SoftPrompt.init(tiny.model, tiny.tokenizer, PromptConfig(n_tokens=4, init="vocab", seed=5))
    sp.save(tmp_path / "p", str(tiny_model_dir), tiny.model, PromptMeta.record(RunConfig(model=str(tiny_model_dir))))
    return tmp_path / "p"


def in_process(prompt_dir, sources, max_new_tokens=6, batch_size=8) -> list[str]:
    from paraphrase_ray.api import decoding_for, paraphrase_texts
    from paraphrase_ray.prompt.bundle import load_prompt

    loaded, bundle = load_prompt(prompt_dir, device="cpu")  # the precision the actors pick too
    gen = decoding_for(bundle.info, 1, max_new_tokens=max_new_tokens)
    return [c[0] for c in paraphrase_texts(loaded, bundle, sources, gen, batch_size)]


def test_parquet_in_and_out_in_process(prompt_dir, tmp_path, capsys):
    src, dst = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), src)
    assert main(["paraphrase", "--prompt", str(prompt_dir), "--input", str(src), "--output", str(dst),
                 "--max-new-tokens", "6", "--batch-size", "8", "--device", "cpu", "--num-candidates", "1"]) == 0
    out = pq.read_table(dst).to_pylist()
    assert [(r["id"], r["source"]) for r in out] == [(r["id"], r["source"]) for r in ROWS]  # carried through
    assert [r["prediction"] for r in out] == in_process(prompt_dir, [r["source"] for r in ROWS])
    assert "wrote 5 paraphrases" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_data_greedy_equals_in_process_parquet(ray_session, prompt_dir, tmp_path):
    from paraphrase_ray.prompt.directory import PromptMeta
    from paraphrase_ray.serve.batch import ActorPool, paraphrase_dataset

    src, dst = tmp_path / "in.parquet", tmp_path / "out"
    pq.write_table(pa.Table.from_pylist(ROWS), src)
    gen = PromptMeta.read(prompt_dir).decoding(max_new_tokens=6)
    paraphrase_dataset(prompt_dir, str(src), str(dst), gen, device="cpu", pool=ActorPool(concurrency=1, batch_size=8))
    out = pq.read_table(dst).to_pylist()  # a directory of Parquet files, rows in input order
    assert [r["id"] for r in out] == [1, 2, 3, 4, 5]
    assert [r["prediction"] for r in out] == in_process(prompt_dir, [r["source"] for r in ROWS])


@pytest.mark.slow
def test_ray_cli_jsonl_with_candidates_and_empty_rows(ray_session, prompt_dir, tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [*ROWS[:3], {"id": 9, "source": ""}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["paraphrase", "--prompt", str(prompt_dir), "--input", str(src), "--output", str(dst), "--ray",
                 "--concurrency", "2", "--num-cpus", "0.5", "--num-candidates", "2", "--max-new-tokens", "6",
                 "--device", "cpu"]) == 0
    assert dst.is_dir() and "wrote paraphrases to" in capsys.readouterr().err
    out = [json.loads(line) for f in sorted(dst.glob("*.json*")) for line in f.read_text().splitlines()]
    assert [r["id"] for r in out] == [1, 2, 3, 9]
    from serve_helpers import assert_best_first

    assert all(r["prediction"] == r["candidates"][0] and len(r["candidates"]) == 2 for r in out[:3])
    assert_best_first([r["source"] for r in out[:3]], [r["candidates"] for r in out[:3]])  # ranked on the actors
    assert out[3]["prediction"] == "" and out[3]["candidates"] == [""]  # an empty source does not fail the job


def test_ray_argument_errors_are_named_before_starting_ray(prompt_dir, tmp_path, capsys):
    from paraphrase_ray.serve.batch import ActorPool, paraphrase_dataset

    gen = PromptMeta.read(prompt_dir).generation
    with pytest.raises(ConfigError, match="--concurrency must be >= 1"):
        paraphrase_dataset(prompt_dir, "x.parquet", "out", gen, pool=ActorPool(concurrency=0))
    with pytest.raises(ConfigError, match="input not found: .*missing.parquet"):
        paraphrase_dataset(prompt_dir, str(tmp_path / "missing.parquet"), "out", gen)
    assert main(["paraphrase", "--prompt", str(prompt_dir), "--text", "Hi there.", "--ray"]) == 2
    assert "--ray paraphrases files" in capsys.readouterr().err


def test_an_actor_pool_that_would_starve_reads_is_refused_on_a_local_ray():
    from paraphrase_ray.serve.batch import check_cpus

    check_cpus(2, 2, 0.5, None)
    with pytest.raises(ConfigError, match="--concurrency 2 x --num-cpus 1 leaves no CPU for reading"):
        check_cpus(2, 2, 1.0, None)
    check_cpus(2, 2, 1.0, "auto")  # a cluster may autoscale: a warning only


@pytest.mark.slow
def test_ray_data_reads_and_writes_gs_through_the_emulator(ray_session, prompt_dir, tmp_path, monkeypatch):
    """gs:// input, output and prompt (a bucket on a local GCS emulator, options in the URI's query)."""
    import pyarrow.fs as pafs
    from gcs_emulator import GcsEmulator

    from paraphrase_ray.prompt.directory import PromptMeta
    from paraphrase_ray.serve.batch import ActorPool, paraphrase_dataset

    monkeypatch.setenv("PARAPHRASE_RAY_CACHE", str(tmp_path / "cache"))
    with GcsEmulator(bucket="data", log=tmp_path / "emulator.log") as gcs:
        fs = gcs.fs()
        with fs.open_output_stream("data/in/part-0.parquet") as f:
            pq.write_table(pa.Table.from_pylist(ROWS[:3]), f)
        pafs.copy_files(str(prompt_dir), "data/prompts/p", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        gen = PromptMeta.read(prompt_dir).decoding(max_new_tokens=6)
        paraphrase_dataset(gcs.uri("prompts/p"), gcs.uri("in"), gcs.uri("out"), gen, device="cpu",
                           pool=ActorPool(batch_size=8))
        files = [i.path for i in fs.get_file_info(pafs.FileSelector("data/out")) if i.path.endswith(".parquet")]
        out = [row for path in sorted(files) for row in pq.read_table(path, filesystem=fs).to_pylist()]
    assert [r["id"] for r in out] == [1, 2, 3]
    assert [r["prediction"] for r in out] == in_process(prompt_dir, [r["source"] for r in ROWS[:3]])


@pytest.mark.slow
def test_ray_output_never_deletes_what_it_did_not_write(ray_session, prompt_dir, tmp_path, capsys):
    """Ray Data's OVERWRITE emptied --output before the input was read: `--output .`, `--output runs/sweeps` or an
    output holding the input were wiped (issue 24). Now a non-empty output needs --overwrite, and one that holds the
    input is refused even with it; every file stays as it was."""
    out = tmp_path / "results"
    (out / "sub").mkdir(parents=True)
    (out / "README.md").write_text("my notes\n")
    (out / "sub" / "kept.parquet").write_bytes(b"PAR1 someone's data")
    src = out / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))

    def files() -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    before = files()
    base = ["paraphrase", "--prompt", str(prompt_dir), "--ray", "--num-candidates", "1", "--max-new-tokens", "4",
            "--device", "cpu"]
    other = tmp_path / "other.jsonl"
    other.write_text(src.read_text())
    assert main([*base, "--input", str(other), "--output", str(out)]) == 2
    assert "already exists and is not empty: pass --overwrite" in capsys.readouterr().err
    for output in (out, tmp_path):  # holds the input, or a parent of it
        assert main([*base, "--input", str(src), "--output", str(output), "--overwrite"]) == 2
        assert "holds the input" in capsys.readouterr().err
    assert files() == before
    # into a new or empty directory nothing needs asking; --overwrite replaces a directory of old results
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert main([*base, "--input", str(other), "--output", str(fresh)]) == 0
    assert sum(len(pq.read_table(f)) for f in fresh.glob("*.parquet")) == 2
    assert main([*base, "--input", str(other), "--output", str(fresh), "--overwrite"]) == 0
    assert sum(len(pq.read_table(f)) for f in fresh.glob("*.parquet")) == 2  # replaced, not appended


@pytest.mark.slow
def test_ray_data_packs_four_actors_at_a_quarter_gpu_on_one_card(ray_session, prompt_dir, tmp_path, monkeypatch):
    """README: ``--concurrency 4 --num-gpus 0.25`` packs four actors on one GPU. On the shared Ray's one logical GPU
    the real job's four actors each hold a 0.25 share of GPU 0, all four alive at once, and their greedy outputs
    equal the in-process ones. Each actor is the real ``PromptActor`` with a few lines that report, on arrival, what
    Ray gave it to a named barrier actor, then wait (up to a deadline) until all four have arrived."""
    import time

    import ray

    from paraphrase_ray.serve import batch
    from paraphrase_ray.serve.batch import ActorPool, paraphrase_dataset

    name, namespace = "batch-packing-barrier", "batch-packing-test"

    @ray.remote(num_cpus=0)
    class Barrier:
        def __init__(self):
            self.records: list[dict] = []

        def arrive(self, record: dict) -> None:
            self.records.append(record)

        def get(self) -> list[dict]:
            return self.records

    class ReportingActor(batch.PromptActor):  # defined here: Ray ships it by value, so workers need no test module
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            ctx = ray.get_runtime_context()
            here = ray.get_actor(name, namespace=namespace)
            ray.get(here.arrive.remote({
                "pid": os.getpid(), "actor_id": ctx.get_actor_id(), "gpu_ids": ctx.get_accelerator_ids().get("GPU"),
                "resources": ctx.get_assigned_resources(), "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
            }))
            deadline = time.time() + 120  # four model loads on a busy 2-core machine; packing is what counts
            while len(ray.get(here.get.remote())) < 4 and time.time() < deadline:
                time.sleep(0.2)
            self.together = len(ray.get(here.get.remote())) >= 4  # all four actors alive at the same time

        def __call__(self, batch_df):
            out = super().__call__(batch_df)
            out["actor_together"], out["actor_pid"] = self.together, os.getpid()
            return out

    assert ray.available_resources().get("GPU") == 1  # the one logical card is free
    rows = ROWS + [{"id": 6, "source": "The river flooded the lower town."},
                   {"id": 7, "source": "She finished the report on Monday."},
                   {"id": 8, "source": "Tickets sold out within an hour."}]
    src, dst = tmp_path / "in", tmp_path / "out"  # four Parquet files: four blocks to spread over the actors
    src.mkdir()
    for i in range(4):
        pq.write_table(pa.Table.from_pylist(rows[2 * i:2 * i + 2]), src / f"part-{i}.parquet")
    gen = PromptMeta.read(prompt_dir).decoding(max_new_tokens=6)
    monkeypatch.setattr(batch, "PromptActor", ReportingActor)
    # a read unit per file (Ray Data bin-packs Parquet row groups up to 128 MiB): several actors get work, as a big
    # input gives it
    monkeypatch.setenv("RAY_DATA_PARQUET_BIN_PACKING_BYTES", "1")
    barrier = Barrier.options(name=name, namespace=namespace).remote()
    try:
        ray.get(barrier.get.remote())
        paraphrase_dataset(prompt_dir, str(src), str(dst), gen, device="cpu",
                           pool=ActorPool(concurrency=4, num_gpus=0.25, num_cpus=0.5, batch_size=2))
        records = ray.get(barrier.get.remote())
    finally:
        ray.kill(barrier)
    assert len(records) == 4, records  # four actors, no more (none restarted) and no fewer
    assert len({r["actor_id"] for r in records}) == 4 and len({r["pid"] for r in records}) == 4  # four processes
    for r in records:  # each holds a quarter of the one card, GPU 0 (Ray points CUDA at it)
        assert r["resources"].get("GPU") == 0.25 and r["resources"].get("CPU") == 0.5, r
        assert r["gpu_ids"] == ["0"] and r["cuda_visible"] == "0", r
    out = pq.read_table(dst).to_pylist()
    assert all(r["actor_together"] for r in out)  # every batch ran on an actor that saw all four alive at once
    assert {r["actor_pid"] for r in out} <= {r["pid"] for r in records}  # (how Ray spreads the blocks may vary)
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert [r["prediction"] for r in out] == in_process(prompt_dir, [r["source"] for r in rows])

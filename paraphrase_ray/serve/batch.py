"""Paraphrase files at scale with Ray Data: ``paraphrase-ray paraphrase --ray --input ... --output ...``.

The same generation as the in-process path (``api.paraphrase_texts``: the prompt's template and decoding,
candidates reranked alike), run by a pool of ``concurrency`` actors through ``Dataset.map_batches``; each actor
loads the base model and the prompt once and then paraphrases batch after batch. Greedy outputs equal the
in-process ones. Ray Data's progress bars show the run on the terminal.

Input: a Parquet, JSONL (``.jsonl``/``.json``), CSV or TSV file, or a directory of Parquet files, on a local path
or ``gs://`` (any filesystem pyarrow reads). It needs a ``source`` column; the other columns are carried through.
Output: a *directory* of Parquet files (JSONL files when its name ends in ``.jsonl``/``.json``), one per block,
rows in input order, with ``prediction`` (and ``candidates``, best first, when K > 1) added. A row whose
``source`` is empty gets an empty prediction instead of failing the job.

On a multi-node cluster use ``gs://`` (or another shared filesystem) for input and output: a local path is read
and written on whichever node runs the task. A ``gs://`` URI may carry pyarrow's GCS options (``storage.py``: an
emulator, an endpoint, anonymous access). The prompt directory (local or ``gs://``) is read once by the driver
and shipped to the actors.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paraphrase_ray.config import GenerationConfig, from_dict, to_dict
from paraphrase_ray.errors import ConfigError
from paraphrase_ray.evaluation.embedder import DEFAULT_EMBEDDER
from paraphrase_ray.prompt.directory import CONFIG_FILE, META_FILE, WEIGHTS_FILE
from paraphrase_ray.prompt.soft_prompt import SoftPrompt
from paraphrase_ray.storage import check_output, is_uri, open_uri, resolve_prompt_dir

log = logging.getLogger("paraphrase_ray")

JSON_SUFFIXES = (".jsonl", ".json")


class PromptActor:
    """One Ray Data actor: the base model + prompt loaded once; ``__call__`` paraphrases one pandas batch."""

    def __init__(
        self, files: dict[str, bytes], model: str | None, device: str, generation: dict[str, Any],
        batch_size: int, embedder: str,
    ):
        from paraphrase_ray.prompt.bundle import load_prompt

        self.dir = Path(tempfile.mkdtemp(prefix="paraphrase-ray-prompt-"))
        for name, data in files.items():
            (self.dir / name).write_bytes(data)
        self.loaded, self.bundle = load_prompt(self.dir, model, device)
        self.gen = from_dict(GenerationConfig, generation)
        self.batch_size = batch_size
        self.embedder = None
        if self.gen.num_return_sequences > 1:
            from paraphrase_ray.evaluation.embedder import load_embedder

            self.embedder = load_embedder(embedder)

    def __call__(self, batch):  # pandas.DataFrame -> pandas.DataFrame with prediction (+ candidates)
        from paraphrase_ray.api import paraphrase_texts

        sources = batch["source"].tolist()
        keep = [i for i, s in enumerate(sources) if isinstance(s, str) and s.strip()]
        found = paraphrase_texts(
            self.loaded, self.bundle, [sources[i] for i in keep], self.gen, self.batch_size, self.embedder
        ) if keep else []
        cands: list[list[str]] = [[""] for _ in sources]
        for i, c in zip(keep, found):
            cands[i] = c
        out = batch.copy()
        out["prediction"] = [c[0] for c in cands]
        if self.gen.num_return_sequences > 1:
            out["candidates"] = cands
        return out


def _location(path: str) -> tuple[str, Any, str]:
    """(path for Ray Data, its pyarrow filesystem or None for local, suffix): URIs through ``storage.open_uri``."""
    if not is_uri(path):
        return str(Path(path).expanduser().resolve()), None, Path(path).suffix.lower()
    fs, inner, base, _ = open_uri(path)
    return inner, fs, Path(base).suffix.lower()


def read_dataset(path: str):
    """A Ray Dataset of ``path`` by its suffix (a directory or an unknown suffix is read as Parquet)."""
    import ray.data

    where, fs, suffix = _location(path)
    if suffix in JSON_SUFFIXES:
        return ray.data.read_json(where, lines=True, filesystem=fs)
    if suffix in (".csv", ".tsv"):
        import pyarrow.csv as pacsv

        delimiter = "\t" if suffix == ".tsv" else ","
        return ray.data.read_csv(where, filesystem=fs, parse_options=pacsv.ParseOptions(delimiter=delimiter))
    return ray.data.read_parquet(where, filesystem=fs)


def write_dataset(ds, path: str, overwrite: bool = False) -> None:
    """Write ``ds`` as a directory of JSONL files (name ends in .jsonl/.json) or Parquet files. ``overwrite``: what
    is there is deleted first (Ray's OVERWRITE, before the input is read: ``storage.check_output`` runs first);
    else nothing is deleted (APPEND into a new or empty directory)."""
    from ray.data import SaveMode

    where, fs, suffix = _location(path)
    mode = SaveMode.OVERWRITE if overwrite else SaveMode.APPEND
    if suffix in JSON_SUFFIXES:
        ds.write_json(where, filesystem=fs, mode=mode, force_ascii=False)
    else:
        ds.write_parquet(where, filesystem=fs, mode=mode)


@dataclass(frozen=True)
class ActorPool:
    """Where a Ray Data job runs: ``concurrency`` actors, each taking ``num_gpus`` (a share of a card packs several
    on one GPU) and ``num_cpus`` (its torch threads), fed ``batch_size`` rows per call (also its generation
    batch), on the Ray at ``address`` (``auto``: the cluster this runs on; None: a fresh local Ray)."""

    concurrency: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    batch_size: int = 16
    address: str | None = None
    overwrite: bool = False  # replace a non-empty output directory (never one that holds the input)


def paraphrase_dataset(
    prompt_dir: str | Path,
    input_path: str,
    output_path: str,
    gen: GenerationConfig,
    model: str | None = None,
    device: str = "auto",
    embedder: str = DEFAULT_EMBEDDER,
    pool: ActorPool | None = None,
) -> str:
    """Paraphrase every row of ``input_path`` into ``output_path`` with a pool of actors (``ActorPool``).

    Connects to ``pool.address`` or starts a local Ray, unless Ray is already initialised. Returns the output path.
    """
    import ray

    pool = pool or ActorPool()
    concurrency, num_gpus, num_cpus = pool.concurrency, pool.num_gpus, pool.num_cpus
    batch_size, address = pool.batch_size, pool.address
    if concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {concurrency}")
    if num_gpus < 0 or num_cpus < 0:
        raise ConfigError("--num-gpus and --num-cpus must be >= 0")
    if not is_uri(input_path) and not Path(input_path).exists():
        raise ConfigError(f"input not found: {input_path}")
    check_output(output_path, [input_path], pool.overwrite)  # before Ray deletes anything
    local = resolve_prompt_dir(str(prompt_dir))  # a gs:// prompt is fetched once, here
    SoftPrompt.load(local)  # fail here, not in every actor, on a bad prompt directory
    files = {n: (local / n).read_bytes() for n in (CONFIG_FILE, WEIGHTS_FILE, META_FILE) if (local / n).is_file()}
    started = False
    if not ray.is_initialized():
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        ray.init(address=address or "local", include_dashboard=False, logging_level="WARNING")
        started = True
    try:
        check_cpus(ray.cluster_resources().get("CPU", 0.0), concurrency, num_cpus, address)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # output rows in input order
        ds = read_dataset(input_path)
        columns = ds.schema().names
        if "source" not in columns:
            raise ConfigError(f"{input_path} has no 'source' column (columns: {', '.join(columns)})")
        ds = ds.map_batches(
            PromptActor,
            fn_constructor_kwargs={
                "files": files, "model": model, "device": device, "generation": to_dict(gen),
                "batch_size": batch_size, "embedder": embedder,
            },
            batch_size=batch_size,
            batch_format="pandas",
            concurrency=concurrency,
            num_gpus=num_gpus or None,
            num_cpus=num_cpus,
        )
        write_dataset(ds, output_path, pool.overwrite)
    finally:
        if started:
            ray.shutdown()
    log.info("wrote paraphrases to %s", output_path)
    return output_path


def check_cpus(cpus: float, concurrency: int, num_cpus: float, address: str | None) -> None:
    """The actor pool must leave a CPU for Ray Data's read and write tasks, or the job waits forever."""
    if concurrency * num_cpus + 1 <= cpus:
        return
    msg = (
        f"--concurrency {concurrency} x --num-cpus {num_cpus:g} leaves no CPU for reading and writing on this Ray "
        f"cluster ({cpus:g} CPUs): lower --concurrency, or give each actor less (--num-cpus 0.5)"
    )
    if address is None:  # a local Ray cannot grow
        raise ConfigError(msg)
    log.warning("warning: %s (an autoscaling cluster may add nodes)", msg)

"""The prompt store: every prompt directory under a local directory or a bucket prefix, servable by its path.

``serve --prompt-store DIR|gs://BUCKET/prefix`` (``prompt_store:`` in serve/config.yaml): a request for model
``sweeps/quickstart/best`` loads ``<store>/sweeps/quickstart/best`` on first use into a bounded LRU of this replica
(a soft prompt is a few KB, so one replica holds hundreds), checked against the replica's base model. Nothing is
registered: a prompt written into the store after the server started is servable on its next request.

Freshness: each use compares the directory's fingerprint (size and mtime of its weights, metadata and bucket
manifest) with the loaded copy's and loads it again when they differ, so an updated prompt is never served stale.
The prefix cache (``generation/prefix_cache.py``) is keyed by the prompt's values, so new weights never meet old
cached keys either. A bucket's prompt is fetched through ``storage.resolve_prompt_dir``: only a copy that matches
its manifest, never half of an old and half of a new prompt.

No Ray here: the model replica (``deployments.ParaphraseModel``) owns one store and calls ``get`` in a thread.

    store = PromptStore("runs", "smollm2-135m", embed_dim=576)
    store.names()                       # ["sweeps/quickstart/best", ...]
    served = store.get("sweeps/quickstart/best", device)   # a System, from the LRU or loaded now
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from fastapi import HTTPException

from paraphrase_ray.errors import ParaphraseRayError
from paraphrase_ray.prompt.bundle import System, load_bundle
from paraphrase_ray.prompt.directory import CONFIG_FILE, META_FILE, WEIGHTS_FILE, PromptMeta
from paraphrase_ray.serve.protocol import MODEL_NAME_MAX, MODEL_NAME_PATTERN
from paraphrase_ray.storage import MANIFEST_FILE, check_bucket, is_uri, open_uri, resolve_prompt_dir

_NAME_RE = re.compile(MODEL_NAME_PATTERN)
FINGERPRINT_FILES = (WEIGHTS_FILE, META_FILE, CONFIG_FILE, MANIFEST_FILE)


def same_base(a: str | None, b: str) -> bool:
    """Whether a prompt recorded for base model ``a`` runs on ``b`` (an alias and its hub id are the same model)."""
    from paraphrase_ray.models import hub_id

    return a is not None and (a == b or hub_id(a) == hub_id(b))


class PromptStore:
    """Prompt directories under ``location`` for one replica's base model; ``capacity`` loaded ones kept (LRU)."""

    def __init__(self, location: str, base_model: str, embed_dim: int, capacity: int = 256) -> None:
        self.location, self.base_model, self.embed_dim, self.capacity = location, base_model, embed_dim, capacity
        if is_uri(location):
            self.fs, self.root, self._uri, query = open_uri(location)
            check_bucket(self.fs, self.root, self._uri)
            self._query = f"?{query}" if query else ""
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
            self._uri = self._query = ""
        if self.fs.get_file_info(self.root).type != pafs.FileType.Directory:
            raise ParaphraseRayError(f"prompt store {location} is not a directory")
        self._lru: OrderedDict[str, tuple[tuple, System]] = OrderedDict()
        self._meta: dict[str, tuple[tuple, dict[str, Any]]] = {}  # name -> (fingerprint, listing fields)
        self._lock = threading.Lock()
        self.counts = {"hits": 0, "loads": 0, "reloads": 0, "evictions": 0}
        self.load_s: list[float] = []  # seconds of each load (the first-use cost), the last 100

    # -- what is in the store ------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every prompt directory under the store (one holding the weights file), by relative path, sorted."""
        found = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        names = []
        for info in found:
            if info.type == pafs.FileType.File and info.base_name == WEIGHTS_FILE:
                rel = info.path[len(self.root.rstrip("/")) + 1 : -len(WEIGHTS_FILE)].strip("/")
                if rel and len(rel) <= MODEL_NAME_MAX and _NAME_RE.match(rel):  # skips hidden / temp directories
                    names.append(rel)
        return sorted(names)

    def fingerprint(self, name: str) -> tuple | None:
        """What changes when the directory's files do; None when it holds no weights (not a prompt, or not yet).

        Local: inode, size and mtime of each file (a replaced file is a new inode, even within the clock's
        resolution). A bucket: size and mtime of each object, and the manifest's content (its hashes)."""
        if not self._uri:
            stats = []
            for f in FINGERPRINT_FILES:
                try:
                    st = os.stat(self._path(name, f))
                    stats.append((st.st_ino, st.st_size, st.st_mtime_ns))
                except OSError:
                    stats.append(None)
            return tuple(stats) if stats[0] is not None else None
        infos = self.fs.get_file_info([self._path(name, f) for f in FINGERPRINT_FILES])
        if infos[0].type != pafs.FileType.File:
            return None
        manifest = b""
        if infos[-1].type == pafs.FileType.File:
            with self.fs.open_input_stream(infos[-1].path) as f:
                manifest = f.read()
        return (*((i.size, i.mtime_ns) if i.type == pafs.FileType.File else None for i in infos), manifest)

    def describe(self, name: str) -> dict[str, Any]:
        """What ``/v1/models`` and ``/prompts`` list for ``name``: its base model, metrics and whether it runs here."""
        fp = self.fingerprint(name)
        with self._lock:
            hit = self._meta.get(name)
        if hit is None or hit[0] != fp:
            try:
                meta = PromptMeta.from_dict(self._read_meta(name))
                info = {"base_model": meta.base_model, "metrics": meta.metrics, "init": meta.init}
            except (OSError, ValueError, ParaphraseRayError):
                info = {"base_model": None, "metrics": {}, "init": None}
            info["servable"] = same_base(info["base_model"], self.base_model)
            with self._lock:
                self._meta[name] = (fp, info)
                if len(self._meta) > 4 * self.capacity:
                    self._meta.pop(next(iter(self._meta)))
            return info
        return hit[1]

    def listing(self) -> list[dict[str, Any]]:
        return [{"name": n, "source": "store", **self.describe(n)} for n in self.names()]

    # -- serving ---------------------------------------------------------------------------------------------------
    def get(self, name: str, device: Any = None) -> System:
        """The prompt at ``name`` as a ``System``: the loaded copy while the directory is unchanged, else loaded now.

        404: nothing servable there; 422: another base model or embedding width, or unreadable files; 503 with
        Retry-After: the directory is being written (its files changed while it was read)."""
        if len(name) > MODEL_NAME_MAX or not _NAME_RE.match(name):
            raise HTTPException(404, f"{name!r} is not a prompt path under the store (names joined by '/')")
        fp = self.fingerprint(name)
        if fp is None:
            raise HTTPException(404, self.missing(name))
        with self._lock:
            hit = self._lru.get(name)
            if hit is not None and hit[0] == fp:
                self._lru.move_to_end(name)
                self.counts["hits"] += 1
                return hit[1]
        t0 = time.perf_counter()
        served = self._load(name, fp, device)
        with self._lock:
            self.counts["reloads" if name in self._lru else "loads"] += 1
            self._lru[name] = (fp, served)
            self._lru.move_to_end(name)
            while len(self._lru) > self.capacity:
                self._lru.popitem(last=False)
                self.counts["evictions"] += 1
            self.load_s = [*self.load_s[-99:], time.perf_counter() - t0]
        return served

    def missing(self, name: str) -> str:
        return (f"unknown model {name!r}: neither a served prompt nor a prompt directory under the prompt store "
                f"{self.location} (GET /v1/models lists them)")

    def summary(self) -> dict[str, Any]:
        """For ``GET /stats``: loaded prompts, hits / loads / evictions and what a load cost (first use)."""
        with self._lock:
            loads = sorted(self.load_s)
            return {
                "location": self.location, "loaded": len(self._lru), "capacity": self.capacity, **self.counts,
                "load_ms_last": round(self.load_s[-1] * 1e3, 2) if loads else None,
                "load_ms_median": round(loads[len(loads) // 2] * 1e3, 2) if loads else None,
            }

    def _load(self, name: str, fp: tuple, device: Any) -> System:
        meta = PromptMeta.from_dict(self._read_meta(name))
        if not same_base(meta.base_model, self.base_model):
            raise HTTPException(
                422,
                f"model {name!r} is a prompt for base model {meta.base_model!r}, but this server runs "
                f"{self.base_model!r}: serve it where {meta.base_model!r} runs, or retrain it on {self.base_model!r}",
            )
        try:
            local = resolve_prompt_dir(self._uri + "/" + name + self._query) if self._uri else self._path(name)
            bundle = load_bundle(local, expected_dim=self.embed_dim)
        except ParaphraseRayError as e:
            raise HTTPException(422, f"model {name!r}: {e}") from None
        except OSError as e:  # a file went missing under the read: being replaced
            raise HTTPException(503, f"model {name!r} is being written ({e.__class__.__name__}); retry",
                                headers={"Retry-After": "1"}) from None
        if not self._uri and self.fingerprint(name) != fp:  # replaced while read: never a mix of two versions
            raise HTTPException(503, f"model {name!r} changed while it was read; retry", headers={"Retry-After": "1"})
        if device is not None:
            bundle.prompt.to(device)
        served = System.from_bundle(bundle, name)
        return served

    def _path(self, name: str, file: str = "") -> str:
        return "/".join(p for p in (self.root.rstrip("/"), name, file) if p)

    def _read_meta(self, name: str) -> dict[str, Any]:
        """``paraphrase_ray.json`` (or a PEFT directory's base model), read in place (a bucket too)."""
        if not self._uri:
            from paraphrase_ray.prompt.directory import read_meta

            return read_meta(self._path(name))
        out: dict[str, Any] = {}
        for file in (CONFIG_FILE, META_FILE):
            try:
                with self.fs.open_input_stream(self._path(name, file)) as f:
                    doc = json.loads(f.read())
            except (OSError, ValueError):
                continue
            if file == CONFIG_FILE:
                out["base_model"] = doc.get("base_model_name_or_path")
            else:
                out = {**doc, "base_model": doc.get("base_model") or out.get("base_model")}
        return out

"""Where sweeps and prompts live: a local path or a URI (``gs://``, ``file://``), through ``pyarrow.fs``.

A ``gs://`` URI may carry pyarrow's GCS options as a query string, for an emulator or a private endpoint::

    gs://BUCKET/PREFIX?endpoint_override=127.0.0.1:4443&scheme=http&anonymous=true&retry_limit_seconds=15

(``FileSystem.from_uri`` does not accept ``anonymous``, so such a URI gets its ``GcsFileSystem`` built here.)
Without options, credentials come from the environment (Application Default Credentials, a VM's service
account). ``resolve_prompt_dir`` brings a prompt directory in a bucket to a local cache, so a Serve replica
reads it on its own node; nothing needs the disk of the machine that started it.

A bucket has no atomic rename, so a directory published there (a sweep's ``best/``: ``SweepStorage.upload_dir``)
carries a manifest, written first as "incomplete" and last with every file's sha256: ``resolve_prompt_dir``
takes only a copy that matches it (retrying while it is being replaced), never a mix of two prompts.
``check_output`` keeps a command from writing over what it did not write (or over its own input).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qsl

import pyarrow.fs as pafs

from paraphrase_ray.errors import ConfigError, PromptFileError
from paraphrase_ray.files import publish_dir

GCS_OPTIONS = ("endpoint_override", "scheme", "anonymous", "retry_limit_seconds", "project_id")
MANIFEST_FILE = ".manifest.json"  # in a directory published to a bucket: which files are complete
INCOMPLETE_MANIFEST = json.dumps({"complete": False}).encode()  # written first: the directory is being replaced
FETCH_ATTEMPTS, FETCH_RETRY_S = 4, 2.0  # a directory being replaced is fetched again, this often, this far apart


def is_uri(location: str) -> bool:
    return "://" in str(location)


def open_uri(uri: str) -> tuple[pafs.FileSystem, str, str, str]:
    """``uri`` -> (filesystem, path inside it, the URI without its query, the query). Errors name the URI."""
    base, _, query = uri.partition("?")
    base = base.rstrip("/")
    scheme = base.split("://", 1)[0]
    try:
        if not query:
            fs, path = pafs.FileSystem.from_uri(base)
            return fs, path.rstrip("/"), base, ""
        if scheme != "gs":
            raise ConfigError(f"{uri!r}: only gs:// URIs take options (?{query})")
        opts = dict(parse_qsl(query, keep_blank_values=True))
        unknown = sorted(set(opts) - set(GCS_OPTIONS))
        if unknown:
            raise ConfigError(f"{uri!r}: unknown option(s) {unknown}; known: {list(GCS_OPTIONS)}")
        kwargs: dict = {k: opts[k] for k in ("endpoint_override", "scheme", "project_id") if k in opts}
        if "retry_limit_seconds" in opts:
            kwargs["retry_time_limit"] = timedelta(seconds=float(opts["retry_limit_seconds"]))
        anonymous = opts.get("anonymous", "false").lower() in ("1", "true", "yes")
        return pafs.GcsFileSystem(anonymous=anonymous, **kwargs), base[len("gs://") :], base, query
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"{uri!r} is not a usable filesystem URI: {e}") from e


def check_bucket(fs: pafs.FileSystem, path: str, uri: str) -> None:
    """For a bucket URI: fail now, naming the bucket, if it is unreachable, missing, or not ours to read."""
    if not isinstance(fs, pafs.GcsFileSystem):
        return
    bucket = path.split("/", 1)[0]
    hint = "gs:// needs credentials that can read and write it: README.md, 'Run on Google Cloud'"
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:  # unreachable endpoint, refused credentials, permissions
        first = str(e).strip().splitlines()[0][:300]
        raise ConfigError(f"cannot reach bucket {bucket!r} of {uri}: {first} ({hint})") from e
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"bucket {bucket!r} of {uri} does not exist, or these credentials cannot see it ({hint})")


def manifest(files: dict[str, bytes]) -> bytes:
    """The manifest of a complete directory of ``files`` (name -> content): each one's size and sha256."""
    listed = {n: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in sorted(files.items())}
    return json.dumps({"complete": True, "files": listed}, indent=2).encode()


def publish_files(fs: pafs.FileSystem, path: str, files: dict[str, bytes]) -> None:
    """Replace directory ``path`` of ``fs`` with ``files`` (name -> content) so that no reader takes a mix of the
    old and the new. Local: filled beside it and swapped in whole (``files.publish_dir``). A bucket, with no
    atomic rename: the manifest is marked incomplete, the old files go, the new ones are written, and the manifest
    written last lists them with their hashes; ``resolve_prompt_dir`` uses only a copy that matches it."""
    if isinstance(fs, pafs.LocalFileSystem):
        def fill(staged: Path) -> None:
            for name, content in files.items():
                (staged / name).write_bytes(content)

        publish_dir(path, fill)
        return

    fs.create_dir(path, recursive=True)
    _put(fs, f"{path}/{MANIFEST_FILE}", INCOMPLETE_MANIFEST)
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type == pafs.FileType.File and info.base_name != MANIFEST_FILE:
            fs.delete_file(info.path)
    for name, content in files.items():
        _put(fs, f"{path}/{name}", content)
    _put(fs, f"{path}/{MANIFEST_FILE}", manifest(files))


def _put(fs: pafs.FileSystem, path: str, content: bytes) -> None:
    with fs.open_output_stream(path) as f:  # a bucket's object appears when its upload completes
        f.write(content)


def manifest_problem(local: Path) -> str | None:
    """What keeps a fetched directory from being used, by its manifest (None: complete, or no manifest: not
    published by ``SweepStorage``); files it does not list (a killed writer's) are removed from the copy."""
    path = local / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_bytes())
        files = doc["files"] if doc.get("complete") else None
        listed = {n: str(f["sha256"]) for n, f in (files or {}).items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST_FILE} is unreadable"
    if files is None:
        return "it is being written, or its writer was stopped before it finished"
    for name, sha in listed.items():
        f = local / name
        if not f.is_file() or hashlib.sha256(f.read_bytes()).hexdigest() != sha:
            return f"{name} does not match {MANIFEST_FILE} (the directory is being replaced)"
    for f in local.iterdir():
        if f.name not in listed and f.name != MANIFEST_FILE and f.is_file():
            f.unlink()
    return None


def check_output(output: str, inputs: Sequence[str] = (), overwrite: bool = False, flag: str = "--output") -> None:
    """An output a command may write (local path or URI): never one that is, or holds, one of ``inputs`` (writing
    would delete them before they are read), and unless ``overwrite`` nothing there yet (missing, empty)."""
    fs, where = _fs_path(output)
    for inp in inputs:
        ifs, iwhere = _fs_path(inp)
        if type(ifs) is type(fs) and (iwhere == where or iwhere.startswith(where.rstrip("/") + "/")):
            raise ConfigError(f"{flag} {output} holds the input {inp}: it would be replaced before it is read; "
                              f"give another {flag}")
    info = fs.get_file_info(where)
    if info.type == pafs.FileType.File:
        taken = (info.size or 0) > 0
    elif info.type == pafs.FileType.Directory:
        taken = bool(fs.get_file_info(pafs.FileSelector(where, allow_not_found=True)))
    else:
        taken = False
    if taken and not overwrite:
        raise ConfigError(f"{flag} {output} already exists and is not empty: pass --overwrite to replace it, "
                          "or give a new path")


def _fs_path(location: str) -> tuple[pafs.FileSystem, str]:
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    fs, path, _, _ = open_uri(location)
    return fs, path


def download_dir(fs: pafs.FileSystem, path: str, local: Path) -> Path:
    """Copy directory ``path`` of ``fs`` (recursively) into the local directory ``local`` (new or empty)."""
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def prompt_cache_key(uri: str) -> str:
    """The cache directory's name for ``uri`` (its options included: two emulators never share one)."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def resolve_prompt_dir(location: str) -> Path:
    """A prompt directory as a local path: a path resolved as given, or a URI downloaded to the local cache.

    A URI is fetched afresh on every call (a prompt is a few kilobytes, and a later sweep may replace
    ``best/``) into ``$PARAPHRASE_RAY_CACHE/prompts/<prompt_cache_key>``, swapped in whole. A copy that does not
    match its manifest (``best/`` being replaced, or its writer killed) is fetched again a few times, then refused
    (PromptFileError): never half of one prompt and half of another.
    """
    if not is_uri(location):
        return Path(location).expanduser().resolve()
    from paraphrase_ray.models import cache_dir

    fs, path, base, _ = open_uri(location)
    check_bucket(fs, path, base)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise ConfigError(f"{base} is not a directory (a prompt directory, such as a sweep's best/)")
    target = cache_dir() / "prompts" / prompt_cache_key(location)
    problem = ""

    def fetch(staged: Path) -> None:
        nonlocal problem
        download_dir(fs, path, staged)
        problem = manifest_problem(staged) or ""
        if problem:
            raise PromptFileError(problem)

    for attempt in range(FETCH_ATTEMPTS):
        try:
            return publish_dir(target, fetch)  # swapped in whole: a replica never reads half a fetched copy
        except PromptFileError:
            if attempt + 1 < FETCH_ATTEMPTS:
                time.sleep(FETCH_RETRY_S)
    raise PromptFileError(f"{base} is incomplete: {problem}; try again once it is written (a sweep's best/: "
                          "run the sweep's tune command again with --resume to export it again)")

"""Where sweeps and prompts live: a local path or a URI (``gs://``, ``file://``), through ``pyarrow.fs``.

A ``gs://`` URI may carry pyarrow's GCS options as a query string, for an emulator or a private endpoint::

    gs://BUCKET/PREFIX?endpoint_override=127.0.0.1:4443&scheme=http&anonymous=true&retry_limit_seconds=15

(``FileSystem.from_uri`` does not accept ``anonymous``, so such a URI gets its ``GcsFileSystem`` built here.)
Without options, credentials come from the environment (Application Default Credentials, a VM's service
account). ``resolve_prompt_dir`` brings a prompt directory in a bucket to a local cache, so a Serve replica
reads it on its own node; nothing needs the disk of the machine that started it.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qsl

import pyarrow.fs as pafs

from paraphrase_ray.errors import ConfigError

GCS_OPTIONS = ("endpoint_override", "scheme", "anonymous", "retry_limit_seconds", "project_id")


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


def download_dir(fs: pafs.FileSystem, path: str, local: Path) -> Path:
    """Copy directory ``path`` of ``fs`` (recursively) into the new local directory ``local``."""
    local.mkdir(parents=True, exist_ok=False)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def prompt_cache_key(uri: str) -> str:
    """The cache directory's name for ``uri`` (its options included: two emulators never share one)."""
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def resolve_prompt_dir(location: str) -> Path:
    """A prompt directory as a local path: a path resolved as given, or a URI downloaded to the local cache.

    A URI is fetched afresh on every call (a prompt is a few kilobytes, and a later sweep may replace
    ``best/``) into ``$PARAPHRASE_RAY_CACHE/prompts/<prompt_cache_key>``, swapped in whole.
    """
    if not is_uri(location):
        return Path(location).expanduser().resolve()
    from paraphrase_ray.models import cache_dir

    fs, path, base, _ = open_uri(location)
    check_bucket(fs, path, base)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise ConfigError(f"{base} is not a directory (a prompt directory, such as a sweep's best/)")
    target = cache_dir() / "prompts" / prompt_cache_key(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        download_dir(fs, path, tmp / "prompt")
        old = target.with_name(f"{target.name}.old-{tmp.name}")
        try:
            target.rename(old)
        except FileNotFoundError:
            pass
        try:
            (tmp / "prompt").rename(target)
        except OSError:  # another process put a fresh copy there in between: use that one
            pass
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

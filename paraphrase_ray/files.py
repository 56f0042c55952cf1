"""Crash-safe file writes shared by every stage that saves something a user keeps.

One rule everywhere: write a unique sibling temp (same directory, so the rename stays on one filesystem),
flush it to disk (fsync), rename it over the target, fsync the directory. A crash (SIGKILL, Ctrl-C, power loss)
at any point leaves the previous file intact or the new one, never half of one; an error removes the temp, and
the temps a killed writer left behind are removed by the next writer of the same target.

A directory that is read as a whole (a training checkpoint, a sweep's ``best/``) is published the same way:
``publish_dir`` fills a fresh copy beside it, fsyncs it, and swaps it into place in one rename, so a reader
(a Serve replica restarting, ``--resume``) sees the old directory or the new one, never a mix.
``exclusive_lock`` is a lock between processes that dies with its holder (never a stale lock file).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def temp_sibling(path: str | Path) -> Path:
    """A name beside ``path`` that no other writer uses: ``.NAME.tmp-HOST-PID-RANDOM`` (never created here)."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temps of ``path`` (``temp_sibling``) whose writer on this machine is no longer running."""
    p = Path(path)
    prefix = f".{p.name}.tmp-{_HOST}-"
    try:
        entries = list(os.scandir(p.parent))
    except OSError:
        return []
    removed = []
    for entry in entries:
        pid = entry.name[len(prefix) :].split("-", 1)[0] if entry.name.startswith(prefix) else ""
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
        removed.append(Path(entry.path))
    return removed


def fsync_path(path: str | Path) -> None:
    """Flush a file (or a directory's entries) to disk; a filesystem that cannot fsync a directory is let be."""
    is_dir = Path(path).is_dir()
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_dir else 0))
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under ``root``, then every directory, deepest first."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(dirpath)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` for a unique sibling temp path, fsync it, rename it to ``path`` (parents are created).

    On any error (or Ctrl-C) the temp is removed and ``path`` is as it was."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = temp_sibling(out)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(out.parent)
    return out


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the OS cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def publish_dir(path: str | Path, fill: Callable[[Path], Any], replace: bool = True) -> Path:
    """Write directory ``path`` as a whole: ``fill(staged)`` writes into a fresh directory of the same name beside
    it (``.NAME.tmp-*/NAME``, so a file that records its directory's name records the right one); everything is
    fsynced, then ``staged`` takes ``path``'s place in one atomic exchange (where the OS has none: two renames,
    with ``path`` briefly absent, never mixed). ``replace=False``: an existing ``path`` is kept and ``staged``
    dropped (first writer wins). On an error nothing changes; a killed writer's temp goes with the next publish.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    holder = temp_sibling(out)
    staged = holder / out.name
    try:
        staged.mkdir(parents=True)
        fill(staged)
        fsync_tree(staged)
        if not out.exists():
            try:
                os.rename(staged, out)
            except OSError:  # another writer published it in between
                if not replace:
                    return out
        if staged.exists() and replace and not _exchange(staged, out):
            os.rename(out, holder / ".old")
            os.rename(staged, out)
        fsync_path(out.parent)
    finally:
        shutil.rmtree(holder, ignore_errors=True)  # the old directory (swapped out) or an unused copy
    return out


@contextlib.contextmanager
def exclusive_lock(path: str | Path, wait_s: float):
    """Hold an exclusive ``flock`` on ``path`` (created if needed). The OS drops it when its holder exits or is
    killed, so it is never stale; a live holder is waited for ``wait_s`` seconds, then TimeoutError."""
    import fcntl

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"another process has held {p} for over {wait_s:g} s") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{_HOST} {os.getpid()}\n".encode())  # who holds it, for a person looking
        yield p
    finally:
        os.close(fd)  # releases the lock


def jsonable(obj: Any) -> Any:
    """NaN/inf become null, so the file is strict JSON that any reader accepts."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(jsonable(data), indent=2, ensure_ascii=False, default=str) + "\n")


def write_records(path: str | Path, records: list[dict]) -> Path:
    """JSONL, or Parquet when ``path`` ends in .parquet; never a half-written file (``atomic_write``)."""
    if str(path).lower().endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        return atomic_write(path, lambda tmp: pq.write_table(pa.Table.from_pylist(records), str(tmp)))

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    return atomic_write(path, write)

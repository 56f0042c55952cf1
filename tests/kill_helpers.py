"""Kill a writer halfway: run a script in a fresh process until one of its monkeypatched hooks pauses, then SIGKILL.

A script gets its ``ready`` file as its last argument and calls ``pause()`` (from ``PAUSE``) where it should stop:
``pause`` touches ``ready`` and sleeps, and the test kills the process there, as a crash or ``kill -9`` would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PAUSE = '''
import sys, time
from pathlib import Path
READY = Path(sys.argv[-1])

def pause():
    READY.touch()
    time.sleep(600)

def pausing(original, when):
    """``original`` that pauses before a call for which ``when(*args)`` is true."""
    def hooked(*args, **kwargs):
        if when(*args):
            pause()
        return original(*args, **kwargs)
    return hooked
'''


def run_script(script: str, *args: str, tmp_path: Path, env: dict | None = None, timeout: float = 120) -> None:
    """Run ``PAUSE + script`` to completion (no hook pauses it); fail with its stderr if it fails."""
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    done = subprocess.run([sys.executable, "-c", PAUSE + script, *args, str(ready)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    assert not ready.exists(), "the script paused, but it was meant to run to the end"


def kill_when_paused(script: str, *args: str, tmp_path: Path, env: dict | None = None, timeout: float = 120) -> None:
    """Run ``PAUSE + script`` until it pauses, then SIGKILL it (no cleanup, no finally, no atexit)."""
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", PAUSE + script, *args, str(ready)], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the writer ended (rc {proc.returncode}) before it paused: {proc.stderr.read()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the writer did not reach its pause within {timeout} s")
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()

"""A Google Cloud Storage emulator on 127.0.0.1 for tests: ``gcp-storage-emulator`` (pure Python, test extra).

    with GcsEmulator(bucket="sweeps") as gcs:
        storage = gcs.uri("prefix")   # gs://sweeps/prefix?endpoint_override=127.0.0.1:PORT&scheme=http&anonymous=true...
        fs = gcs.fs()                 # the same bucket as a pyarrow GcsFileSystem
        gcs.listing("prefix"), gcs.read("prefix/file")   # what tests check

It keeps objects in memory and serves one request at a time; it stops (the process is killed) on exit.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GcsEmulator:
    def __init__(self, bucket: str = "sweeps", log: Path | None = None, retry_s: int = 20):
        self.bucket, self.port, self.log, self.retry_s = bucket, free_port(), log, retry_s
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def options(self) -> str:
        return f"endpoint_override={self.endpoint}&scheme=http&anonymous=true&retry_limit_seconds={self.retry_s}"

    def uri(self, prefix: str = "", bucket: str | None = None) -> str:
        path = "/".join(p for p in (bucket or self.bucket, prefix) if p)
        return f"gs://{path}?{self.options()}"

    def fs(self):
        import pyarrow.fs as pafs

        return pafs.GcsFileSystem(
            anonymous=True, scheme="http", endpoint_override=self.endpoint, retry_time_limit=timedelta(seconds=10)
        )

    def listing(self, prefix: str) -> dict[str, int]:
        """Files under gs://BUCKET/prefix: relative path -> size."""
        import pyarrow.fs as pafs

        root = f"{self.bucket}/{prefix}"
        infos = self.fs().get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        return {i.path[len(root) + 1 :]: i.size for i in infos if i.type == pafs.FileType.File}

    def read(self, path: str) -> bytes:
        """The bytes of gs://BUCKET/path."""
        with self.fs().open_input_stream(f"{self.bucket}/{path}") as f:
            return f.read()

    def start(self) -> GcsEmulator:
        cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--default-bucket", self.bucket, "--in-memory"]
        if self.log:
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        else:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the GCS emulator exited with {self.proc.returncode} (log: {self.log})")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the GCS emulator did not start listening within 60 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def __enter__(self) -> GcsEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

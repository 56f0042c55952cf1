"""``Paraphraser.from_pretrained("USER/NAME")`` downloads the prompt from the Hugging Face Hub (README: "a prompt dir, a
PEFT dir, or USER/NAME"), through the real ``huggingface_hub.snapshot_download``, from a local hub.

The local hub is a stdlib HTTP server on 127.0.0.1 (a thread of this process) answering exactly the requests the
installed huggingface_hub (2.x) makes for ``snapshot_download`` of a model repo:

- ``GET  /api/models/{repo}/revision/{rev}``            repo_info: the commit sha (401 + ``X-Error-Code: RepoNotFound``
  for an unknown repo, as huggingface.co answers an anonymous client)
- ``GET  /api/models/{repo}/tree/{sha}?recursive=True``  list_repo_tree: path, size, git blob oid (+ lfs oid/size)
- ``HEAD /{repo}/resolve/{sha}/{file}``                  hf_hub_download's metadata: ``X-Repo-Commit``, ``ETag``
  (``X-Linked-Etag`` / ``X-Linked-Size`` for an LFS file), ``Content-Length``
- ``GET  /{repo}/resolve/{sha}/{file}``                  the bytes

The client is pointed at it the way a user points it at a mirror: ``HF_ENDPOINT`` in the environment of a fresh
Python (huggingface_hub reads it once, into ``constants.ENDPOINT``, when it is first imported, and this test process
imported it long ago with conftest's ``HF_HUB_OFFLINE=1``), with a fresh ``HF_HOME`` and no token.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

pytestmark = pytest.mark.slow  # a fresh Python (torch, transformers) against the local hub: ~15 s on 2 cores

REPO = "someone/tiny-paraphrase-prompt"
MISSING = "nobody/no-such-prompt"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEXTS = ["The bank raised its rates again.", "Snow fell all night long."]
EXTRA_FILE = "notes/training-log.txt"  # in the repo, not a prompt file: snapshot_download must not fetch it


class LocalHub:
    """A model repo (``repo_id`` -> {path: bytes}) served the way huggingface.co serves one; every request recorded."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub.answer(self, head=True)

            def do_GET(self):
                hub.answer(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    @staticmethod
    def is_lfs(path: str) -> bool:
        return path.endswith(".safetensors")  # as the Hub stores weights

    @staticmethod
    def git_oid(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        self.requests.append((h.command, path))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path):
            repo = self.repos.get(m[1])
            if repo is None:
                return self.not_found(h, head)
            return self.send(h, head, 200, json.dumps({
                "id": m[1], "modelId": m[1], "sha": COMMIT, "private": False,
                "siblings": [{"rfilename": p} for p in sorted(repo)],
            }).encode(), {"Content-Type": "application/json"})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):
            repo = self.repos.get(m[1])
            if repo is None:
                return self.not_found(h, head)
            entries = []
            for p, data in sorted(repo.items()):
                entry = {"type": "file", "path": p, "size": len(data), "oid": self.git_oid(data)}
                if self.is_lfs(p):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            return self.send(h, head, 200, json.dumps(entries).encode(), {"Content-Type": "application/json"})
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            repo = self.repos.get(m[1])
            if repo is None:
                return self.not_found(h, head)
            if m[3] not in repo:
                return self.send(h, head, 404, b'{"error":"Entry not found"}',
                                 {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
            data = repo[m[3]]
            etag = hashlib.sha256(data).hexdigest() if self.is_lfs(m[3]) else self.git_oid(data)
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
            if self.is_lfs(m[3]):
                headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))}
            return self.send(h, head, 200, data, headers)
        return self.send(h, head, 404, b'{"error":"no such route on the local hub"}', {})

    @staticmethod
    def not_found(h: BaseHTTPRequestHandler, head: bool) -> None:
        LocalHub.send(h, head, 401, b'{"error":"Repository not found"}',
                      {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found",
                       "Content-Type": "application/json"})

    @staticmethod
    def send(h: BaseHTTPRequestHandler, head: bool, status: int, body: bytes, headers: dict[str, str]) -> None:
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(body)


# What a user runs, in a fresh Python whose environment points huggingface_hub at the local hub.
CHILD = """
import json, sys
from safetensors.torch import save_file
from paraphrase_ray import Paraphraser
from paraphrase_ray.errors import PromptFileError

repo, missing, out, texts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
p = Paraphraser.from_pretrained(repo, device="cpu")
save_file({"prompt": p.bundle.prompt.weight.detach().contiguous()}, out)
result = {"dir": str(p.bundle.path), "predictions": p.paraphrase(texts, num_candidates=1, max_new_tokens=8)}
try:
    Paraphraser.from_pretrained(missing, device="cpu")
    result["missing"] = None
except PromptFileError as e:
    result["missing"] = str(e)
print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def served_prompt(tiny_model_dir, tmp_path_factory) -> Path:
    """A random 4-token prompt on the tiny OPT, as ``train`` writes one (adapter files, paraphrase_ray.json, card)."""
    from serve_helpers import make_prompt

    from paraphrase_ray.models import load_model

    loaded = load_model(str(tiny_model_dir), precision="fp32", device="cpu", cache=False)
    return make_prompt(tmp_path_factory.mktemp("hub-prompt") / "p", tiny_model_dir, loaded, seed=3)


@pytest.fixture(scope="module")
def downloaded(served_prompt, tmp_path_factory):
    """One fresh Python against the local hub: the downloaded Paraphraser's prompt and paraphrases, and the error for
    an unknown repo; the requests the hub saw."""
    from paraphrase_ray.prompt.directory import PROMPT_FILES

    files = {name: (served_prompt / name).read_bytes() for name in PROMPT_FILES if (served_prompt / name).is_file()}
    assert set(files) == set(PROMPT_FILES)  # adapter config + weights, paraphrase_ray.json, the card
    repo_files = {**files, ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
                  EXTRA_FILE: b"not part of the prompt\n"}
    work = tmp_path_factory.mktemp("hub-client")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}  # no token, no cache
    with LocalHub({REPO: repo_files}) as hub:
        env |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(work / "hf-home"), "HF_HUB_OFFLINE": "0",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1",
                "no_proxy": "127.0.0.1"}
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, REPO, MISSING, str(work / "prompt.safetensors"), json.dumps(TEXTS)],
            cwd=work, env=env, capture_output=True, text=True, timeout=300,  # cwd: no relative USER/NAME dir here
        )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return {"result": json.loads(line[len("RESULT "):]), "requests": hub.requests, "files": files,
            "prompt_file": work / "prompt.safetensors", "hf_home": work / "hf-home"}


def test_a_hub_id_downloads_the_served_prompt_and_paraphrases_like_the_local_dir(served_prompt, downloaded):
    from safetensors.torch import load_file

    from paraphrase_ray import Paraphraser
    from paraphrase_ray.prompt.soft_prompt import SoftPrompt

    result, requests = downloaded["result"], downloaded["requests"]
    # the real client's requests, against the endpoint HF_ENDPOINT named
    assert ("GET", f"/api/models/{REPO}/revision/main") in requests
    assert ("GET", f"/api/models/{REPO}/tree/{COMMIT}") in requests
    fetched = {p.rsplit("/", 1)[-1] for m, p in requests if m == "GET" and f"/{REPO}/resolve/" in p}
    assert fetched == set(downloaded["files"])  # every prompt file; not .gitattributes, not notes/
    assert not any(EXTRA_FILE in p for _, p in requests)
    # into the HF cache of HF_HOME, byte for byte
    snapshot = Path(result["dir"])
    assert snapshot.is_relative_to(downloaded["hf_home"] / "hub") and snapshot.name == COMMIT
    assert {p.name: p.read_bytes() for p in snapshot.iterdir()} == downloaded["files"]
    # the Paraphraser it built holds exactly the served prompt, and paraphrases as the local directory does
    served = SoftPrompt.load(served_prompt).weight.detach()
    got = load_file(downloaded["prompt_file"])["prompt"]
    assert got.dtype == served.dtype and got.shape == served.shape and bool((got == served).all())
    local = Paraphraser.from_pretrained(served_prompt, device="cpu")
    expected = local.paraphrase(TEXTS, num_candidates=1, max_new_tokens=8)
    assert result["predictions"] == expected and all(isinstance(p, str) for p in expected)


def test_an_unknown_hub_repo_is_a_prompt_file_error_naming_it(downloaded):
    """The hub answers an unknown (or private, to an anonymous client) repo with 401 + ``X-Error-Code: RepoNotFound``."""
    message = downloaded["result"]["missing"]
    assert message is not None, "from_pretrained of an unknown repo did not raise PromptFileError"
    assert ("GET", f"/api/models/{MISSING}/revision/main") in downloaded["requests"]  # it did ask the hub
    assert message.startswith(f"{MISSING} is not a local prompt directory, and downloading it from the Hugging Face "
                              "Hub failed")
    # the reason in words (the hub client's own first line is only "401 Client Error."), and the fix
    assert f"repository {MISSING} not found (check the USER/NAME; for a private repo, run `hf auth login`" in message

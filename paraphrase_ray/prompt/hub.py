"""A prompt directory on the Hugging Face Hub: ``paraphrase-ray push`` and downloads."""

from __future__ import annotations

import os
import re
from pathlib import Path

from paraphrase_ray.errors import HubError, PromptFileError
from paraphrase_ray.prompt.directory import META_FILE, PROMPT_FILES, write_card

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def push_prompt(
    prompt_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None
) -> str:
    """Upload a prompt directory's files (not its checkpoints) to the Hub model repo ``repo_id``; return its URL.

    Everything a user can get wrong is checked before the first request: the directory, the repo id, a token.
    """
    from paraphrase_ray.prompt.soft_prompt import SoftPrompt  # torch: only when pushing

    path = Path(prompt_dir)
    SoftPrompt.load(path)  # a real, readable prompt directory (PromptFileError otherwise)
    if not _REPO_ID.fullmatch(repo_id or ""):
        raise HubError(f"--repo-id must look like USER/NAME (or ORG/NAME), got {repo_id!r}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise HubError("HF_HUB_OFFLINE is set: unset it to push to the Hugging Face Hub")
    import huggingface_hub as hf

    token = token or hf.get_token()
    if not token:
        raise HubError(
            "no Hugging Face token: run `hf auth login`, or set HF_TOKEN to a token with write access "
            "(https://huggingface.co/settings/tokens)"
        )
    if (path / META_FILE).is_file():
        write_card(path)  # the card matches the files being pushed
    present = [f for f in PROMPT_FILES if (path / f).is_file()]
    try:
        hf.create_repo(repo_id, private=private, exist_ok=True, token=token, repo_type="model")
        hf.upload_folder(
            repo_id=repo_id, folder_path=str(path), allow_patterns=present, token=token, repo_type="model",
            commit_message=f"paraphrase-ray push of {path.resolve().name}",
        )
    except Exception as e:  # the hub client raises several types (HTTP, connection, auth)
        raise HubError(f"push to {repo_id} failed: {_first_line(e)}") from e
    return f"https://huggingface.co/{repo_id}"


def download_prompt(repo_id: str) -> Path:
    """A local copy of a prompt on the Hub (the HF cache; works offline once cached)."""
    if not _REPO_ID.fullmatch(repo_id):
        raise PromptFileError(f"prompt directory not found: {repo_id} (and it is not a USER/NAME hub id)")
    import huggingface_hub as hf

    try:
        return Path(hf.snapshot_download(repo_id, allow_patterns=list(PROMPT_FILES)))
    except Exception as e:  # offline, unknown repo, no access
        raise PromptFileError(
            f"{repo_id} is not a local prompt directory, and downloading it from the Hugging Face Hub failed: "
            f"{_download_reason(e, repo_id)}"
        ) from e


def _download_reason(e: Exception, repo_id: str) -> str:
    """Why a download failed, in words: the hub client's first line is only "401 Client Error." for a missing repo."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    login = "run `hf auth login` or set HF_TOKEN"
    if isinstance(e, GatedRepoError):  # before its base class, RepositoryNotFoundError
        return f"{repo_id} is gated: accept its conditions on the Hub, then {login}"
    if isinstance(e, RepositoryNotFoundError):
        return f"repository {repo_id} not found (check the USER/NAME; for a private repo, {login})"
    if isinstance(e, RevisionNotFoundError):
        return f"{repo_id} has no main branch"
    return _first_line(e)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

"""Publishing folders to the Hugging Face Hub: verified datasets and per-cycle checkpoints.

One commit per upload. A checkpoint also gets a tag named after its cycle, so researchers load any cycle
with ``SentenceTransformer(repo, revision="c001")`` while the repository's main branch holds the newest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

RepoType = Literal["dataset", "model"]


@dataclass(frozen=True)
class HubUpload:
    repo_id: str
    commit_url: str
    commit_oid: str
    tag: str | None = None


def upload_files(
    files: Mapping[str, Path],
    repo_id: str,
    token: str,
    *,
    repo_type: RepoType,
    message: str,
    endpoint: str | None = None,
    private: bool = False,
    tag: str | None = None,
) -> HubUpload:
    """Create the repository if needed, upload `files` (path in repo → local file) in one commit, tag it.

    Re-publishing a tag that exists moves it to the new commit: a re-trained cycle replaces its checkpoint.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if not files:
        raise ValueError(f"nothing to publish to {repo_id}: no files")
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"cannot publish to {repo_id}: missing {', '.join(missing)}")
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, repo_type=repo_type, exist_ok=True, private=private)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in sorted(files.items())
    ]
    commit = api.create_commit(repo_id, operations, commit_message=message, repo_type=repo_type)
    if tag is not None:
        try:
            api.delete_tag(repo_id, tag=tag, repo_type=repo_type)
        except HfHubHTTPError as error:
            if error.response is None or error.response.status_code != 404:
                raise
        api.create_tag(repo_id, tag=tag, revision=commit.oid, repo_type=repo_type, tag_message=message)
    return HubUpload(repo_id=repo_id, commit_url=str(commit.commit_url), commit_oid=str(commit.oid), tag=tag)


def folder_files(folder: Path, prefix: str = "") -> dict[str, Path]:
    """Every file below `folder`, keyed by its path in the repository (POSIX, under `prefix`).

    Hidden files and folders (locks, caches) stay behind, as huggingface_hub's own upload_folder leaves them.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"nothing to publish: {folder} is not a folder")
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files[prefix + relative.as_posix()] = path
    return files

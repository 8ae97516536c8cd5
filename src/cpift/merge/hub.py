"""Hugging Face Hub: model references, pull (``snapshot_download``) and push (``create_repo`` +
``upload_folder``).

A model argument is a local path or a Hub reference ``org/name`` / ``org/name@revision``. An
existing local path always wins, so a directory that happens to be called ``org/name`` is read from
disk; otherwise a string of the repo-id form is a Hub reference. Pulls fetch only what a merge reads
(safetensors, JSON, tokenizer and chat-template files; ``pytorch_model*.bin`` instead when the repo
has no safetensors file, as transformers falls back to them) into the ordinary Hub cache, so HF_HOME /
HF_HUB_CACHE and HF_HUB_OFFLINE apply as for any huggingface_hub user; the offline flag is also read
when a pull is made, so setting it after huggingface_hub was imported still keeps cpift off the
network.

huggingface_hub is imported inside the functions (CLI start-up time), and every failure of its
client becomes a one-line ``HubError``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cpift.errors import HubError, ParameterError

# What a merge reads: weights, config/index/tokenizer JSON, and the other tokenizer formats that
# merge/io/model_files.SIDE_FILES copies into the output.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt",
                  "*.jinja"]
# The PyTorch pickle weights transformers reads (pytorch_model.bin and its shards; the index is JSON),
# fetched only when a snapshot has no safetensors file: not optimizer.bin or training_args.bin.
BIN_PATTERNS = ["pytorch_model*.bin"]

# The Hub's repo-id grammar (namespace/name, letters, digits, '-', '_', '.'), plus an optional
# @revision (a branch, tag or commit; branches may contain '/').
_REF = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?:@(?P<rev>[^@\s]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def split_ref(ref: str | os.PathLike) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``ref`` has the form ``org/name[@revision]``, else None.

    Example:
        >>> split_ref("Qwen/Qwen2.5-0.5B@main")
        ('Qwen/Qwen2.5-0.5B', 'main')
    """
    m = _REF.fullmatch(os.fspath(ref))
    if m is None or ".." in m["repo"] or "--" in m["repo"]:
        return None
    return m["repo"], m["rev"]


def is_hub_ref(ref: str | os.PathLike) -> bool:
    """True when ``ref`` names a Hub model: it is not an existing local path and has the repo-id form."""
    return not os.path.exists(ref) and split_ref(ref) is not None


def snapshot_commit(path: str | os.PathLike) -> str | None:
    """The commit of a Hub cache snapshot directory (``.../snapshots/<commit>``), else None."""
    p = Path(path)
    return p.name if p.parent.name == "snapshots" and _COMMIT.fullmatch(p.name) else None


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return flag or bool(constants.HF_HUB_OFFLINE)


def _is_transport_error(e: BaseException) -> bool:
    """A connection failure of the HTTP library under huggingface_hub (httpx2, httpx or requests)."""
    return isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.split(".")[0] in (
        "httpx", "httpx2", "requests", "urllib3", "httpcore")


def pull(ref: str, *, local_files_only: bool = False) -> Path:
    """Download (or find in the Hub cache) the files of a Hub model a merge needs.

    Args:
        ref: ``org/name`` or ``org/name@revision`` (branch, tag or commit).
        local_files_only: never use the network (also implied by HF_HUB_OFFLINE=1).

    Returns:
        The snapshot directory in the Hub cache (``.../models--org--name/snapshots/<commit>``).

    Raises:
        HubError: the repo or revision does not exist or is gated/private without access; offline
            (or the Hub unreachable) and not in the cache; any other Hub failure.

    Example:
        >>> pull("Qwen/Qwen2.5-0.5B@main")
        PosixPath('/root/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B/snapshots/...')
    """
    parts = split_ref(ref)
    if parts is None:
        raise ParameterError(f"{ref}: not a Hub model reference (expected org/name or org/name@revision)")
    repo, rev = parts
    offline = local_files_only or _offline()
    try:
        return _download(repo, rev, offline)
    except Exception as e:  # noqa: BLE001 - the Hub's refusals, connection failures and cache I/O; the rest re-raise
        error = _pull_error(e, ref, repo, rev, offline)
        if error is None:
            raise
        raise error from None


def _download(repo: str, rev: str | None, offline: bool) -> Path:
    """The snapshot of what a merge reads; a .bin-only repo's weights too, at the same commit."""
    from huggingface_hub import snapshot_download

    snap = Path(snapshot_download(repo, revision=rev, allow_patterns=ALLOW_PATTERNS, local_files_only=offline))
    if not any(snap.glob("*.safetensors")):
        snap = Path(snapshot_download(repo, revision=snapshot_commit(snap) or rev, allow_patterns=BIN_PATTERNS,
                                      local_files_only=offline))
    return snap


def _pull_error(e: Exception, ref: str, repo: str, rev: str | None, offline: bool) -> HubError | None:
    """The one-line HubError of a failed pull; None for a failure that is not the Hub's, the network's or
    the cache's."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        return HubError(f"{ref}: gated repository on the Hub; accept its terms on the model page and log in "
                        f"(hf auth login, or HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"{ref}: revision '{rev}' not found in the Hub repository {repo}")
    if isinstance(e, RepositoryNotFoundError):
        return HubError(f"{ref}: repository not found on the Hub (check the name; a private repo needs a "
                        f"token: hf auth login, or HF_TOKEN)")
    if isinstance(e, LocalEntryNotFoundError):
        why = "offline (HF_HUB_OFFLINE=1)" if offline else "the Hub could not be reached"
        return HubError(f"{ref}: not in the local Hub cache and {why}; pull it with network access "
                        f"first (cpift-merge pull {ref})")
    if isinstance(e, HfHubHTTPError):
        return HubError(f"{ref}: Hub request failed: {_first_line(e)}")
    if isinstance(e, ValueError):  # huggingface_hub's HFValidationError: a malformed repo id
        return HubError(f"{ref}: {_first_line(e)}")
    if _is_transport_error(e):
        return HubError(f"{ref}: the Hub could not be reached: {_first_line(e)}")
    if isinstance(e, OSError):
        return HubError(f"{ref}: cannot write to the Hub cache: {e.strerror or e}")
    return None


def resolve_model(ref: str | os.PathLike) -> Path:
    """A model argument as a local path: an existing path as is, a Hub reference pulled.

    Anything else is returned unchanged, so the checkpoint reader names it as a missing directory.
    """
    if is_hub_ref(ref):
        return pull(os.fspath(ref))
    return Path(ref)


# cpift's own bookkeeping at the top of a folder (the output marker with its file list, the demo's and
# the bench's markers): local facts, never published.
LOCAL_ONLY = (".cpift-output", ".cpift-demo", ".cpift-bench-model", ".cpift-bench-out")


def _check_finished(folder: Path) -> None:
    """Refuse a partial cpift output: a hidden build or aside directory, or one holding a resume journal."""
    from cpift.merge.io.manifest import RESUME_JOURNAL

    name = folder.resolve().name
    if name.endswith((".cpift-partial", ".cpift-old")) or (folder / RESUME_JOURNAL).is_file():
        raise ParameterError(f"{folder}: an unfinished cpift output (a partial directory); finish the merge "
                             f"(rerun it, with --resume where it was interrupted) and push its output")


def push(folder: str | os.PathLike, repo_id: str, *, private: bool = False,
         revision: str | None = None, commit_message: str | None = None) -> str:
    """Upload a model directory (with its model card) to a Hub model repo, creating the repo if needed.

    Args:
        folder: the directory to upload (every file in it).
        repo_id: ``org/name``.
        private: create the repo private (an existing repo keeps its visibility).
        revision: branch to commit to, created from the default branch if missing (default: main).
        commit_message: default ``Upload NAME with cpift``.

    Returns:
        The URL of the commit.

    Raises:
        ParameterError: ``folder`` is not a directory or ``repo_id`` is malformed.
        HubError: no permission or token, offline, the Hub unreachable, or any Hub failure.

    Example:
        >>> push("merged", "me/merged-ties", private=True)
        'https://huggingface.co/me/merged-ties/commit/...'
    """
    folder = _check_push(Path(folder), repo_id)
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        return _upload(api, folder, repo_id, private=private, revision=revision, commit_message=commit_message)
    except Exception as e:  # noqa: BLE001 - the Hub's refusals and connection failures; the rest re-raise
        error = _push_error(e, repo_id, api.endpoint)
        if error is None:
            raise
        raise error from None


def _check_push(folder: Path, repo_id: str) -> Path:
    """Refuse what is no finished model directory, a malformed repo id, or offline mode; return ``folder``."""
    if not folder.is_dir():
        raise ParameterError(f"{folder}: not a directory (push uploads a model directory)")
    from cpift.merge.io.model_files import vet_tree

    vet_tree(folder)  # nothing from outside the folder is published, and no FIFO blocks the upload
    _check_finished(folder)
    parts = split_ref(repo_id)
    if parts is None or parts[1] is not None:
        raise ParameterError(f"{repo_id}: expected a Hub repo id org/name (give a branch with --revision)")
    if _offline():
        raise HubError(f"{repo_id}: cannot push while offline (HF_HUB_OFFLINE=1)")
    return folder


def _upload(api, folder: Path, repo_id: str, *, private: bool, revision: str | None,
            commit_message: str | None) -> str:
    """Create the repo (and branch) if needed and commit the folder, less cpift's local files; the commit URL."""
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", revision=revision,
                             commit_message=commit_message or f"Upload {folder.resolve().name} with cpift",
                             ignore_patterns=list(LOCAL_ONLY))
    return str(info.commit_url)


def _push_error(e: Exception, repo_id: str, endpoint: str) -> HubError | None:
    """The one-line HubError of a failed push; None for a failure that is not the Hub's or the network's."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    if isinstance(e, RepositoryNotFoundError):
        return HubError(f"{repo_id}: repository not found on the Hub, or no write access (log in with "
                        f"hf auth login, or set HF_TOKEN)")
    if isinstance(e, OfflineModeIsEnabled):
        return HubError(f"{repo_id}: cannot push while offline (HF_HUB_OFFLINE=1)")
    if isinstance(e, ValueError):  # the Hub refused the README.md front matter ("Invalid metadata")
        return HubError(f"{repo_id}: the Hub refused the upload: {' '.join(str(e).split())}")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        hint = " (log in with hf auth login, or set HF_TOKEN)" if status in (401, 403) else ""
        return HubError(f"{repo_id}: Hub request failed ({status}): {_first_line(e)}{hint}")
    if _is_transport_error(e):
        return HubError(f"{repo_id}: cannot reach the Hub at {endpoint}: {_first_line(e)}")
    return None


def check_repo_id(repo_id: str) -> None:
    """Raise ParameterError unless ``repo_id`` is an ``org/name`` that huggingface_hub accepts
    (its ``validate_repo_id``: letters, digits, ``-_.``, no ``--`` or ``..``, at most 96 characters)."""
    from huggingface_hub.utils import validate_repo_id

    parts = split_ref(repo_id)
    try:
        if parts is None or parts[1] is not None:
            raise ValueError("expected org/name")
        validate_repo_id(repo_id)
    except ValueError as e:
        raise ParameterError(f"--push-to-hub: '{repo_id}' is not a Hub repo id org/name "
                             f"({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__

"""Download smash-build artifacts from the Hugging Face Hub (or any Hub-compatible endpoint).

    >>> from smash_runtime.hub import download_artifact, parse_repo_ref
    >>> root = download_artifact("my-org/flux-dev-int8")            # latest commit on main
    >>> root = download_artifact(*parse_repo_ref("my-org/flux-dev-int8@v2"))
    >>> import smash_runtime
    >>> pipe = smash_runtime.load("my-org/flux-dev-int8@3f2a...")    # same, then load

Only ``smash.json`` and the files it lists are fetched (``snapshot_download`` with exactly
those paths), so extra files in the repo cost nothing. Files land in the usual Hugging Face
cache (``HF_HOME`` / ``HF_HUB_CACHE``), so a second load, or one with ``HF_HUB_OFFLINE=1``,
reads from disk. The token comes from where ``huggingface_hub`` looks (``HF_TOKEN``, then
the login cache written by ``hf auth login``) unless passed; it is never put into a message.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ArtifactError, SettingsError, SmashError
from .format import RECORD_FILE, VerifyMode, read_record, verify_files

# The Hub's rules for user/org and repo names.
_NAME = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"{_NAME}/{_NAME}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class HubError(SmashError):
    """Talking to the Hub failed. ``repo_id`` and ``revision`` say what was asked for."""

    def __init__(self, message: str, repo_id: str, revision: str | None = None):
        super().__init__(message)
        self.repo_id = repo_id
        self.revision = revision


class RepoNotFound(HubError):
    """No such repo, or a private/gated one that the token in use (if any) cannot read."""


class RevisionNotFound(HubError):
    """The repo exists but the branch, tag or commit does not."""


class AccessDenied(HubError):
    """The token was rejected, or the repo is gated and the account was not granted access."""


class HubUnavailable(HubError):
    """The Hub could not be reached (or offline mode is on) and the artifact is not cached."""


def parse_repo_ref(ref: str) -> tuple[str, str | None]:
    """``"org/name"`` -> ``("org/name", None)``; ``"org/name@rev"`` -> ``("org/name", "rev")``.

    ``rev`` is a branch, a tag or a commit sha.

    Raises:
        SettingsError: ``ref`` is not of the form ``ORG/NAME`` or ``ORG/NAME@REVISION``.
    """
    allowed = "a Hub repo id ORG/NAME or ORG/NAME@REVISION (letters, digits, '-', '_', '.')"
    if not isinstance(ref, str):
        raise SettingsError("repo", ref, allowed)
    repo_id, sep, revision = ref.strip().partition("@")
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
        raise SettingsError("repo", ref, allowed)
    if sep and not revision.strip():
        raise SettingsError("repo", ref, allowed, hint="the revision after '@' is empty")
    return repo_id, (revision.strip() if sep else None)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _offline() -> bool:
    from huggingface_hub import constants

    # is_offline_mode() is recent; older huggingface_hub releases only have the flag.
    return getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)()


def _token_in_use(token: str | bool | None) -> str | None:
    if token is False:
        return None
    if isinstance(token, str):
        return token
    from huggingface_hub import get_token

    return get_token()


def scrub(text: str, token: str | None) -> str:
    """``text`` with every occurrence of ``token`` replaced: errors must never echo a secret."""
    return text.replace(token, "***") if token else text


def _where(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}@{revision}" if revision else repo_id


def hub_error(exc: Exception, repo_id: str, revision: str | None, token: str | None) -> SmashError:
    """Translate a ``huggingface_hub`` exception into a SmashError that says what to do."""
    from huggingface_hub import errors as hf

    where = _where(repo_id, revision)
    endpoint = _endpoint()
    if isinstance(exc, hf.GatedRepoError):
        return AccessDenied(
            f"{where}: the repo is gated on {endpoint}: request access on its page "
            f"({endpoint}/{repo_id}) and use a token of the account that was granted access "
            "(HF_TOKEN or `hf auth login`).", repo_id, revision)
    if isinstance(exc, hf.RepositoryNotFoundError):
        if token is None:
            return RepoNotFound(
                f"{where}: no such model repo on {endpoint}, or it is private or gated and no Hugging Face "
                "token was found. Check the repo id; for a private repo set HF_TOKEN or run `hf auth login` "
                "with an account that can read it.", repo_id, revision)
        return RepoNotFound(
            f"{where}: no such model repo on {endpoint}, or it is private and the token in use cannot read it "
            "(check the repo id, and that the token's account or org has access).", repo_id, revision)
    if isinstance(exc, hf.RevisionNotFoundError):
        return RevisionNotFound(
            f"{repo_id}: revision {revision!r} does not exist on {endpoint} (expected a branch, a tag or a "
            "full 40-character commit sha).", repo_id, revision)
    if isinstance(exc, hf.RemoteEntryNotFoundError):
        return ArtifactError(
            f"{where} is not a smash-build artifact: the repo has no {RECORD_FILE}. Publish one with "
            "`smash-build publish ARTIFACT --repo ORG/NAME`, or load plain diffusers repos with "
            "DiffusionPipeline.from_pretrained.", file=RECORD_FILE)
    if isinstance(exc, hf.HfHubHTTPError) and exc.response is not None and exc.response.status_code == 401:
        return AccessDenied(
            f"{where}: {endpoint} rejected the Hugging Face token (401: invalid or expired). Create a new token "
            "and set HF_TOKEN or run `hf auth login`.", repo_id, revision)
    if isinstance(exc, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        if _offline():
            return HubUnavailable(
                f"{where} is not (completely) in the local Hugging Face cache "
                f"({_cache_dir()}) and offline mode is on (HF_HUB_OFFLINE=1): download it once with "
                "network access, or unset HF_HUB_OFFLINE.", repo_id, revision)
        return HubUnavailable(
            f"{where}: could not reach {endpoint} and the artifact is not (completely) in the local cache "
            f"({_cache_dir()}). Check the network (HF_ENDPOINT={endpoint}) and try again.", repo_id, revision)
    if isinstance(exc, hf.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return HubError(f"{where}: {endpoint} answered HTTP {status}: {scrub(str(exc), token)}", repo_id, revision)
    return HubError(f"{where}: {type(exc).__name__}: {scrub(str(exc), token)}", repo_id, revision)


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _literal_pattern(path: str) -> str:
    # allow_patterns are fnmatch patterns: escape the metacharacters so each names one file.
    return re.sub(r"([*?\[])", r"[\1]", path)


def download_artifact(
    repo_id: str,
    revision: str | None = None,
    *,
    token: str | bool | None = None,
    verify: VerifyMode = "fast",
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Fetch the artifact in Hub repo ``repo_id`` into the HF cache; return its local folder.

    Args:
        repo_id: ``"ORG/NAME"``, or ``"ORG/NAME@REVISION"`` when ``revision`` is None.
        revision: branch, tag or commit sha; default the repo's ``main``.
        token: a Hub token, ``False`` for none, or None for ``HF_TOKEN`` / the login cache.
        verify: check the files against ``smash.json``: ``"fast"`` hashes each file unless this
            machine already hashed that very, unchanged file (a cached snapshot costs a few
            ``stat`` calls); ``"full"`` hashes every file.
        cache_dir: the HF hub cache to use (default ``HF_HUB_CACHE``).

    Returns:
        The snapshot folder (read it with :func:`smash_runtime.load` or ``read_record``).

    Raises:
        SettingsError: ``repo_id`` is malformed.
        RepoNotFound / RevisionNotFound / AccessDenied / HubUnavailable: see their docs.
        ArtifactError: the repo is not a smash-build artifact, or a file does not match.

    Example:
        >>> root = download_artifact("my-org/tiny-flux@main")
        >>> sorted(p.name for p in root.iterdir())[:3]
        ['README.md', 'model_index.json', 'scheduler']
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    ref_repo, ref_revision = parse_repo_ref(repo_id)
    if ref_revision is not None and revision is not None and ref_revision != revision:
        raise SettingsError("revision", revision, f"the revision in {repo_id!r} ({ref_revision!r}) or None")
    repo_id, revision = ref_repo, revision or ref_revision
    secret = _token_in_use(token)
    kwargs = dict(token=token, cache_dir=str(cache_dir) if cache_dir is not None else None)

    # smash.json first: it says which files make the artifact, and its snapshot folder names
    # the commit the revision resolved to, so every other file is read from that same commit.
    try:
        record_path = Path(hf_hub_download(repo_id, RECORD_FILE, revision=revision, **kwargs))
    except Exception as exc:  # noqa: BLE001 - translated, with the original chained
        raise hub_error(exc, repo_id, revision, secret) from exc
    root = record_path.parent
    commit = root.name if _COMMIT.fullmatch(root.name) else revision
    where = f"{repo_id}@{commit}" if commit else repo_id
    try:
        record = read_record(root)  # every listed path is checked to be plain and relative here
    except ArtifactError as exc:
        raise ArtifactError(f"{where} is not a usable smash-build artifact: {exc}", file=exc.file, field=exc.field) from exc
    patterns = [RECORD_FILE, *(_literal_pattern(rel) for rel in sorted(record.files))]
    try:
        snapshot = Path(snapshot_download(repo_id, revision=commit, allow_patterns=patterns, **kwargs))
    except Exception as exc:  # noqa: BLE001
        raise hub_error(exc, repo_id, revision, secret) from exc
    try:
        verify_files(snapshot, record, mode=verify)
    except ArtifactError as exc:
        raise ArtifactError(f"{where}: {exc}", file=exc.file, field=exc.field) from exc
    return snapshot

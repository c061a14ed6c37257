"""Publish an artifact folder to the Hugging Face Hub as one commit.

    >>> from smash_build.exporters.hub import publish_artifact
    >>> publish_artifact("dist/tiny-flux", "my-org/tiny-flux", dry_run=True).files[:2]
    [('README.md', 1520), ('model_index.json', 512)]
    >>> result = publish_artifact("dist/tiny-flux", "my-org/tiny-flux", private=True)
    >>> result.commit_sha, result.commit_url

What is uploaded is exactly ``smash.json`` plus the files it lists, after checking every one
against its recorded sha256: a tampered or half-written artifact is refused before any
network call. The repo is created if needed (``exist_ok``), the branch too, and everything
goes in one commit through ``huggingface_hub`` (large files through LFS/Xet as the library
decides); files of an earlier publish that the new artifact no longer has are deleted in
that same commit, so the revision holds exactly one artifact. With ``card=`` (the CLI passes
``smash_build.model_card.card_for_repo``) README.md is rewritten for the repo it goes to, and the
uploaded smash.json lists that card; the local folder is left as it is.

The token comes from the argument, else ``HF_TOKEN``, else the login cache (``hf auth
login``). It is passed to ``huggingface_hub`` only: never logged, never written into the
artifact, and scrubbed from every error message.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from smash_runtime.errors import ArtifactError, SettingsError, SmashError
from smash_runtime.format import RECORD_FILE, ArtifactRecord, file_entry, read_record, record_from_data, verify_files
from smash_runtime.hub import parse_repo_ref, scrub

logger = logging.getLogger("smash_build.hub")

# Files the Hub manages itself; an earlier publish's leftovers are deleted, these are kept.
_HUB_OWNED = frozenset({".gitattributes"})


class PublishError(SmashError):
    """Publishing failed: no token, no permission, or the Hub refused the commit."""


@dataclass(frozen=True)
class PublishResult:
    """What was (or, for a dry run, would be) uploaded, and where it went."""

    repo_id: str
    revision: str
    files: list[tuple[str, int]]  # (path in repo, size in bytes), sorted
    dry_run: bool
    private: bool
    commit_sha: str | None = None
    commit_url: str | None = None
    repo_url: str | None = None
    deleted: list[str] = field(default_factory=list)  # stale files of an earlier publish
    ignored: list[str] = field(default_factory=list)  # files in the folder that smash.json does not list

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


# Renders the artifact's card for a Hub repo: (artifact root, smash.json as data, repo id, branch) -> README.md
# text, or None to publish the card as it is. smash_build.model_card.card_for_repo is the one the CLI passes.
CardRenderer = Callable[[Path, dict, str, str], "str | None"]
CARD_FILE = "README.md"


def _files_to_upload(root: Path, record: ArtifactRecord, replaced: dict[str, bytes]) -> tuple[list[tuple[str, int]], list[str]]:
    listed = {RECORD_FILE: (root / RECORD_FILE).stat().st_size}
    listed.update({rel: entry.size for rel, entry in record.files.items()})
    listed.update({rel: len(data) for rel, data in replaced.items()})
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    return sorted(listed.items()), sorted(present - set(listed))


def _card_for_repo(root: Path, record: ArtifactRecord, card: CardRenderer | None, repo_id: str,
                   branch: str) -> dict[str, bytes]:
    """README.md written for the repo, and smash.json listing that README: the files that replace the local ones."""
    if card is None or CARD_FILE not in record.files:
        return {}
    data = record.to_dict()
    text = card(root, data, repo_id, branch)
    if text is None:
        logger.info("%s was edited by hand: publishing it as it is", CARD_FILE)
        return {}
    readme = text.encode("utf-8")
    data["files"][CARD_FILE] = file_entry(readme)
    return {CARD_FILE: readme, RECORD_FILE: record_from_data(data).dumps().encode("utf-8")}


def _resolve_token(token: str | None) -> str:
    if token is None:
        from huggingface_hub import get_token

        token = get_token()
    if not token:
        raise PublishError(
            "no Hugging Face token found: publishing needs a token with write access. Set HF_TOKEN, "
            "or run `hf auth login` (it stores the token in the login cache under HF_HOME), or pass token=."
        )
    return token


def _publish_error(exc: Exception, repo_id: str, step: str, token: str) -> SmashError:
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    endpoint = constants.ENDPOINT
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, hf.HfHubHTTPError) and status == 401:
        return PublishError(
            f"{step} {repo_id}: {endpoint} rejected the Hugging Face token (401): it is invalid or expired. "
            "Create a write token and set HF_TOKEN or run `hf auth login`.")
    if isinstance(exc, hf.HfHubHTTPError) and status == 403:
        return PublishError(
            f"{step} {repo_id}: permission denied (403): the token needs the 'write' role and its account must "
            f"own the namespace {repo_id.split('/')[0]!r} or be a member of that org. Server said: "
            f"{scrub(str(exc), token).splitlines()[-1]}")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return PublishError(f"{step} {repo_id}: the repo does not exist or the token cannot access it.")
    if isinstance(exc, hf.HfHubHTTPError):
        return PublishError(f"{step} {repo_id}: {endpoint} answered HTTP {status}: {scrub(str(exc), token)}")
    return PublishError(f"{step} {repo_id}: {type(exc).__name__}: {scrub(str(exc), token)}")


def publish_artifact(
    path: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
    card: CardRenderer | None = None,
) -> PublishResult:
    """Upload the artifact at ``path`` to Hub model repo ``repo_id`` in one commit.

    Args:
        path: the artifact folder (holds ``smash.json``).
        repo_id: ``"ORG/NAME"``; created if missing.
        private: create the repo private. An existing public repo is refused rather than
            silently published in public.
        revision: the branch to commit to (created from ``main`` if missing); default ``main``.
        commit_message: default ``"Publish smash-build artifact (N files)"``.
        token: a write token; default ``HF_TOKEN``, then the ``hf auth login`` cache.
        dry_run: verify and list what would be uploaded (with sizes); no token, no network.
        card: renders README.md for ``repo_id`` (its load snippet names the repo and branch); the
            uploaded ``smash.json`` then lists that README. The local folder is never changed.

    Returns:
        :class:`PublishResult` with the commit sha and URL (None for a dry run).

    Raises:
        ArtifactError: ``path`` is not an artifact, or a file does not match ``smash.json``
            (the message and ``.file`` name it).
        SettingsError: ``repo_id`` or ``revision`` is malformed.
        PublishError: no token, or the Hub refused (the message never contains the token).
    """
    root = Path(path)
    parsed, at = parse_repo_ref(repo_id)
    if at is not None:
        raise SettingsError("repo", repo_id, "ORG/NAME without '@REVISION'", hint="pass the branch as revision=")
    repo_id = parsed
    branch = revision or "main"
    if branch.startswith("refs/") or len(branch) == 40 and all(c in "0123456789abcdef" for c in branch):
        raise SettingsError("revision", revision, "a branch name (commits go to a branch, not to a commit or ref)")

    record = read_record(root)
    try:
        verify_files(root, record, mode="full")
    except ArtifactError as exc:
        raise ArtifactError(f"refusing to publish {root}: {exc}", file=exc.file, field=exc.field) from exc
    replaced = _card_for_repo(root, record, card, repo_id, branch)
    files, ignored = _files_to_upload(root, record, replaced)
    if ignored:
        logger.warning("not uploading %d file(s) that %s does not list: %s", len(ignored), RECORD_FILE,
                       ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else ""))
    if dry_run:
        return PublishResult(repo_id=repo_id, revision=branch, files=files, dry_run=True, private=private,
                             ignored=ignored)

    secret = _resolve_token(token)
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(token=secret)
    step = "creating repo"
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        step = "reading repo"
        info = api.repo_info(repo_id, repo_type="model")
        if private and not info.private:
            raise PublishError(
                f"{repo_id} already exists and is public; refusing to publish with private=True. Make the repo "
                "private on the Hub first, or publish without --private.")
        if branch != "main":
            step = f"creating branch {branch!r} in"
            api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")
        step = "listing files of"
        existing = set(api.list_repo_files(repo_id, revision=branch, repo_type="model"))
        keep = {rel for rel, _ in files} | _HUB_OWNED
        deleted = sorted(existing - keep)
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=replaced.get(rel, str(root / rel)))
                      for rel, _ in files]
        operations += [CommitOperationDelete(path_in_repo=rel) for rel in deleted]
        step = "committing to"
        logger.info("publishing %d files (%d bytes) to %s@%s", len(files), sum(s for _, s in files), repo_id, branch)
        commit = api.create_commit(
            repo_id, operations, repo_type="model", revision=branch,
            commit_message=commit_message or f"Publish smash-build artifact ({len(files)} files)",
        )
    except SmashError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated, token scrubbed
        raise _publish_error(exc, repo_id, step, secret) from None
    logger.info("published %s@%s: commit %s", repo_id, branch, commit.oid)
    return PublishResult(
        repo_id=repo_id, revision=branch, files=files, dry_run=False, private=bool(info.private),
        commit_sha=commit.oid, commit_url=commit.commit_url, repo_url=str(repo_url), deleted=deleted,
        ignored=ignored,
    )


def publish_from_manifest(path: str | os.PathLike, publish_hub: dict, *, dry_run: bool = False,
                          token: str | None = None, card: CardRenderer | None = None) -> PublishResult:
    """Publish as the manifest's ``[publish.hub]`` table says (``repo``, ``private``, ``revision``,
    ``commit_message``): what ``smash-build MANIFEST --push`` calls after the build."""
    return publish_artifact(
        path, publish_hub["repo"], private=bool(publish_hub.get("private")), revision=publish_hub.get("revision"),
        commit_message=publish_hub.get("commit_message"), token=token, dry_run=dry_run, card=card,
    )


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def format_publish_result(result: PublishResult) -> str:
    """Human-readable summary for the CLI: the file list with sizes (dry run) or the commit sha and URL."""
    where = f"{result.repo_id}@{result.revision}"
    lines = []
    if result.dry_run:
        visibility = "private" if result.private else "public"
        lines.append(f"dry run: would upload {len(result.files)} files ({_human(result.total_bytes)}) to {where} "
                     f"({visibility} if created)")
        width = max(len(_human(size)) for _, size in result.files)
        lines += [f"  {_human(size):>{width}}  {rel}" for rel, size in result.files]
    else:
        lines.append(f"published {len(result.files)} files ({_human(result.total_bytes)}) to {where}")
        if result.deleted:
            lines.append(f"removed {len(result.deleted)} file(s) of the previous artifact: {', '.join(result.deleted)}")
        lines.append(f"commit {result.commit_sha}")
        lines.append(f"{result.commit_url}")
        lines.append(f"load it with: smash_runtime.load(\"{result.repo_id}@{result.commit_sha}\")")
    if result.ignored:
        lines.append(f"not uploaded (not listed in {RECORD_FILE}): {', '.join(result.ignored)}")
    if result.dry_run:
        lines.append("nothing was uploaded")
    return "\n".join(lines)

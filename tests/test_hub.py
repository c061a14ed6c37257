"""Publishing to and loading from the Hugging Face Hub, against a loopback TEST DOUBLE of the Hub.

The real ``huggingface_hub`` client does every request; only the server is a double
(``tests/hub_double``). The round trip runs in fresh processes pointed at the double with
``HF_ENDPOINT`` and an empty ``HF_HOME``; error cases run in-process with
``huggingface_hub.constants`` pointed at the double the same way.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from smash_runtime.errors import ArtifactError, SettingsError
from smash_runtime.format import FORMAT_NAME, FORMAT_VERSION, RECORD_FILE, dumps_record, file_table
from smash_runtime.hub import AccessDenied, HubUnavailable, RepoNotFound, RevisionNotFound, download_artifact, parse_repo_ref

from hub_double import HubDouble

# Distinctive, random per run: if it shows up anywhere it leaked.
TOKEN = "hf_" + secrets.token_hex(16)
READ_TOKEN = "hf_" + secrets.token_hex(16)
OTHER_TOKEN = "hf_" + secrets.token_hex(16)
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
ODD_NAME = "tokenizer/added[1]*.json"  # fnmatch metacharacters: must still be fetched as one literal file


def make_artifact(root: Path, seed: int = 0, extra: dict[str, bytes] | None = None,
                  card: str = '---\nlibrary_name: diffusers\ntags:\n- "smash-build"\n---\n# tiny\n') -> Path:
    """A hand-made artifact: a few files and a smash.json written with smash_runtime.format."""
    rng = random.Random(seed)
    files = {
        "model_index.json": b'{"_class_name": "FluxPipeline"}\n',
        "README.md": card.encode(),
        "transformer/config.json": b'{"num_layers": 1}\n',
        WEIGHTS: bytes(rng.randrange(256) for _ in range(5000)) + b"\0",
        "scheduler/scheduler_config.json": b'{"shift": 3.0}\n',
        ODD_NAME: b"{}\n",
        **(extra or {}),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "pipeline_class": "FluxPipeline",
                "components": {}, "files": file_table(root)}
    (root / RECORD_FILE).write_text(dumps_record(manifest), encoding="utf-8")
    return root


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def assert_no_token(*texts: str, folders: tuple[Path, ...] = (), skip: tuple[Path, ...] = ()) -> None:
    for secret in (TOKEN, READ_TOKEN, OTHER_TOKEN):
        for text in texts:
            assert secret not in text, "a token leaked into captured output"
        for folder in folders:
            for path in Path(folder).rglob("*"):
                if path.is_file() and path not in skip:
                    assert secret.encode() not in path.read_bytes(), f"a token leaked into {path}"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    # page_size=2: tree listings span several pages, so the client's pagination is exercised.
    with HubDouble(tmp_path_factory.mktemp("hub-double"), page_size=2) as double:
        double.add_token(TOKEN, user="alice", orgs=["smash"])
        double.add_token(READ_TOKEN, user="alice", orgs=["smash"], role="read")
        double.add_token(OTHER_TOKEN, user="carol")
        yield double


@pytest.fixture
def client(hub, tmp_path, monkeypatch):
    """This process's huggingface_hub pointed at the double, with an empty cache and no token."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    env = hub.client_env(home)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", env["HF_ENDPOINT"])
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", env["HF_ENDPOINT"] + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the double speaks LFS, not Xet
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    return home


def format_publish_result(result):
    from smash_build.exporters.hub import format_publish_result

    return format_publish_result(result)


def publish(path, repo_id, **kwargs):
    from smash_build.exporters.hub import publish_artifact

    return publish_artifact(path, repo_id, **kwargs)


# --- fresh processes: publish, download with an empty cache, then offline ------------------

PUBLISH = """
import json, sys
from smash_build.exporters.hub import publish_artifact
out = []
for path, repo, revision in json.loads(sys.argv[1]):
    r = publish_artifact(path, repo, revision=revision)
    out.append({"sha": r.commit_sha, "url": r.commit_url, "files": r.files, "revision": r.revision})
print(json.dumps(out))
"""

DOWNLOAD = """
import json, sys
from smash_runtime.hub import download_artifact
print(json.dumps({ref: str(download_artifact(ref)) for ref in json.loads(sys.argv[1])}))
"""


def run_fresh(script: str, arg, env: dict[str, str]) -> tuple[object, str]:
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(arg)], capture_output=True, text=True, env=env,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), output


@pytest.fixture(scope="module")
def round_trip(hub, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("round-trip")
    v1 = make_artifact(tmp / "v1", seed=1)
    v2 = make_artifact(tmp / "v2", seed=2)
    published, pub_out = run_fresh(PUBLISH, [[str(v1), "smash/tiny", None], [str(v2), "smash/tiny", "v2"]],
                                   hub.client_env(tmp / "hf_publisher", token=TOKEN))
    main_sha = published[0]["sha"]
    refs = ["smash/tiny", f"smash/tiny@{main_sha}", "smash/tiny@v2"]
    cache = tmp / "hf_loader"
    assert not cache.exists()
    online, dl_out = run_fresh(DOWNLOAD, refs, hub.client_env(cache))
    before = len(hub.requests)
    offline, off_out = run_fresh(DOWNLOAD, refs, hub.client_env(cache, offline=True))
    return dict(v1=v1, v2=v2, published=published, online=online, offline=offline, cache=cache,
                offline_requests=len(hub.requests) - before, outputs=pub_out + dl_out + off_out, tmp=tmp)


def test_publish_uploads_exactly_the_artifact_in_one_commit(hub, round_trip):
    main, v2 = round_trip["published"]
    assert len(main["sha"]) == 40 and main["url"] == f"{hub.url}/smash/tiny/commit/{main['sha']}"
    assert hub.head("smash/tiny") == main["sha"] and hub.head("smash/tiny", "v2") == v2["sha"]
    # The repo holds the artifact byte for byte, plus the .gitattributes the Hub creates.
    assert hub.files("smash/tiny") == {".gitattributes": hub.files("smash/tiny")[".gitattributes"],
                                       **tree_bytes(round_trip["v1"])}
    assert hub.files("smash/tiny", "v2")[WEIGHTS] == (round_trip["v2"] / WEIGHTS).read_bytes()
    # One commit per publish on top of the repo's initial commit.
    commits = hub.store.repos["smash/tiny"].commits
    assert commits[main["sha"]].parent is not None and commits[commits[main["sha"]].parent].parent is None
    assert sorted(p for p, _ in main["files"]) == sorted(tree_bytes(round_trip["v1"]))


def test_download_by_repo_id_in_fresh_process_with_empty_cache(round_trip):
    main_sha = round_trip["published"][0]["sha"]
    root = Path(round_trip["online"]["smash/tiny"])
    assert root.is_relative_to(round_trip["cache"]) and root.name == main_sha
    # Exactly smash.json and what it lists: not the repo's .gitattributes.
    assert tree_bytes(root) == tree_bytes(round_trip["v1"])
    assert round_trip["online"][f"smash/tiny@{main_sha}"] == str(root)


def test_download_at_branch_revision(round_trip):
    root = Path(round_trip["online"]["smash/tiny@v2"])
    assert root.name == round_trip["published"][1]["sha"]
    assert tree_bytes(root) == tree_bytes(round_trip["v2"])


def test_offline_download_from_warm_cache_makes_no_request(round_trip):
    assert round_trip["offline"] == round_trip["online"]
    assert round_trip["offline_requests"] == 0


def test_token_never_in_output_or_files(round_trip, hub):
    assert_no_token(round_trip["outputs"], folders=(round_trip["tmp"], hub.store.root))
    assert all("Authorization" not in json.dumps(r) for r in hub.requests)


# --- download errors -----------------------------------------------------------------------


@pytest.mark.parametrize("ref, expected", [
    ("org/name", ("org/name", None)),
    ("org/name@main", ("org/name", "main")),
    ("my-org/flux.dev_v2@refs/pr/1", ("my-org/flux.dev_v2", "refs/pr/1")),
    ("org/name@" + "a" * 40, ("org/name", "a" * 40)),
])
def test_parse_repo_ref(ref, expected):
    assert parse_repo_ref(ref) == expected


@pytest.mark.parametrize("ref", ["name", "a/b/c", "org/name@", "/abs/path", "org/-bad", "org/na me", "org/a..b"])
def test_parse_repo_ref_rejects(ref):
    with pytest.raises(SettingsError, match="ORG/NAME"):
        parse_repo_ref(ref)


def test_missing_repo_without_token(client):
    with pytest.raises(RepoNotFound) as err:
        download_artifact("smash/does-not-exist")
    message = str(err.value)
    assert "smash/does-not-exist" in message and "HF_TOKEN" in message and "hf auth login" in message


def test_missing_repo_with_token(client, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", OTHER_TOKEN)
    with pytest.raises(RepoNotFound, match="token in use cannot read it") as err:
        download_artifact("smash/does-not-exist")
    assert OTHER_TOKEN not in str(err.value)


def test_private_repo_needs_a_token_with_access(client, tmp_path, monkeypatch, hub):
    art = make_artifact(tmp_path / "art")
    publish(art, "smash/private-one", private=True, token=TOKEN)
    with pytest.raises(RepoNotFound, match="private or gated and no Hugging Face token was found"):
        download_artifact("smash/private-one")
    with pytest.raises(RepoNotFound, match="private and the token in use cannot read it"):
        download_artifact("smash/private-one", token=OTHER_TOKEN)
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the owner's token, from the usual place
    assert tree_bytes(download_artifact("smash/private-one")) == tree_bytes(art)


def test_cached_artifact_needs_one_request_or_none_when_pinned(client, tmp_path, hub):
    hub.seed_repo("smash/cached", tree_bytes(make_artifact(tmp_path / "art")))
    first = download_artifact("smash/cached")
    before = len(hub.requests)
    assert download_artifact("smash/cached") == first
    assert [r["method"] for r in hub.requests[before:]] == ["HEAD"]  # smash.json at main: which commit?
    before = len(hub.requests)
    assert download_artifact(f"smash/cached@{first.name}") == first
    assert len(hub.requests) == before


def test_gated_repo(client, tmp_path, hub):
    art = make_artifact(tmp_path / "art")
    hub.seed_repo("smash/gated-one", tree_bytes(art), gated=True, granted=("dave",))
    hub.add_token("hf_dave_" + TOKEN[3:], user="dave")
    with pytest.raises(AccessDenied, match="gated"):
        download_artifact("smash/gated-one")
    with pytest.raises(AccessDenied, match="gated"):
        download_artifact("smash/gated-one", token=OTHER_TOKEN)
    assert tree_bytes(download_artifact("smash/gated-one", token="hf_dave_" + TOKEN[3:])) == tree_bytes(art)


def test_invalid_token_is_reported_as_rejected(client):
    with pytest.raises(AccessDenied, match="rejected the Hugging Face token") as err:
        download_artifact("smash/tiny", token="hf_not_a_valid_token_123")
    assert "hf_not_a_valid_token_123" not in str(err.value)


def test_repo_that_is_not_an_artifact(client, hub):
    hub.seed_repo("smash/plain-diffusers", {"model_index.json": b"{}", "unet/config.json": b"{}"})
    with pytest.raises(ArtifactError, match="not a smash-build artifact") as err:
        download_artifact("smash/plain-diffusers")
    assert err.value.file == RECORD_FILE


def test_repo_with_a_foreign_smash_json(client, hub):
    hub.seed_repo("smash/foreign", {RECORD_FILE: b'{"format": "something-else"}'})
    with pytest.raises(ArtifactError, match="smash/foreign@[0-9a-f]{40} is not a usable smash-build artifact"):
        download_artifact("smash/foreign")


def test_unknown_revision(client, tmp_path, hub):
    hub.seed_repo("smash/revs", tree_bytes(make_artifact(tmp_path / "art")))
    with pytest.raises(RevisionNotFound, match="'nope'"):
        download_artifact("smash/revs@nope")


def test_repo_file_not_matching_smash_json_is_refused(client, tmp_path, hub):
    files = tree_bytes(make_artifact(tmp_path / "art"))
    files[WEIGHTS] = files[WEIGHTS][:-1] + b"\1"  # same size, different bytes
    hub.seed_repo("smash/altered", files)
    with pytest.raises(ArtifactError, match="blake3 does not match") as err:
        download_artifact("smash/altered")
    assert err.value.file == WEIGHTS


def test_repo_missing_a_listed_file_is_refused(client, tmp_path, hub):
    files = tree_bytes(make_artifact(tmp_path / "art"))
    del files["transformer/config.json"]
    hub.seed_repo("smash/incomplete", files)
    with pytest.raises(ArtifactError, match="missing") as err:
        download_artifact("smash/incomplete")
    assert err.value.file == "transformer/config.json"


def test_offline_and_not_cached(client, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailable, match="HF_HUB_OFFLINE=1"):
        download_artifact("smash/tiny")


# --- publish -------------------------------------------------------------------------------


def test_publish_without_token_is_refused_before_any_request(client, tmp_path, hub):
    from smash_build.exporters.hub import PublishError

    art = make_artifact(tmp_path / "art")
    before = len(hub.requests)
    with pytest.raises(PublishError, match="no Hugging Face token found") as err:
        publish(art, "smash/no-token")
    assert "HF_TOKEN" in str(err.value) and "hf auth login" in str(err.value)
    assert len(hub.requests) == before


def test_publish_with_token_from_login_cache(client, tmp_path, hub, capfd):
    art = make_artifact(tmp_path / "art")
    (client / "token").parent.mkdir(parents=True, exist_ok=True)
    (client / "token").write_text(TOKEN)  # what `hf auth login` writes
    result = publish(art, "smash/from-login-cache")
    assert hub.head("smash/from-login-cache") == result.commit_sha
    captured = capfd.readouterr()
    assert_no_token(captured.out, captured.err, folders=(art, client), skip=(client / "token",))


@pytest.mark.parametrize("token, repo, match", [
    (READ_TOKEN, "smash/read-only", "needs the 'write' role"),
    (OTHER_TOKEN, "smash/not-carols", "permission denied"),
    ("hf_invalid_" + "x" * 20, "smash/bad-token", "rejected the Hugging Face token"),
], ids=["read-token", "other-users-repo", "invalid-token"])  # ids never show a token (and match across xdist workers)
def test_publish_permission_errors_are_clear(client, tmp_path, token, repo, match, capfd, caplog):
    from smash_build.exporters.hub import PublishError

    art = make_artifact(tmp_path / "art")
    caplog.set_level("DEBUG")
    with pytest.raises(PublishError, match=match) as err:
        publish(art, repo, token=token)
    captured = capfd.readouterr()
    assert token not in str(err.value) + captured.out + captured.err + caplog.text
    assert_no_token(str(err.value), captured.out, captured.err, caplog.text, folders=(art,))


def test_tampered_artifact_is_refused_naming_the_file(client, tmp_path, hub):
    art = make_artifact(tmp_path / "art")
    data = bytearray((art / WEIGHTS).read_bytes())
    data[100] ^= 0x01
    (art / WEIGHTS).write_bytes(bytes(data))
    before = len(hub.requests)
    with pytest.raises(ArtifactError, match="refusing to publish") as err:
        publish(art, "smash/tampered", token=TOKEN)
    assert err.value.file == WEIGHTS and WEIGHTS in str(err.value)
    assert len(hub.requests) == before and "smash/tampered" not in hub.store.repos


def test_dry_run_lists_files_with_sizes_and_uploads_nothing(client, tmp_path, hub):
    art = make_artifact(tmp_path / "art")
    (art / "notes.txt").write_text("not part of the artifact")
    before = len(hub.requests)
    result = publish(art, "smash/dry", dry_run=True)  # no token needed
    expected = {rel: len(data) for rel, data in tree_bytes(art).items() if rel != "notes.txt"}
    assert result.dry_run and result.commit_sha is None
    assert result.files == sorted(expected.items()) and result.total_bytes == sum(expected.values())
    assert result.ignored == ["notes.txt"]
    assert len(hub.requests) == before and "smash/dry" not in hub.store.repos
    text = format_publish_result(result)
    assert all(rel in text for rel in expected) and "nothing was uploaded" in text and "notes.txt" in text


def test_publish_as_the_manifest_says(client, tmp_path, hub):
    from smash_build.manifest import parse_manifest
    from smash_build.exporters.hub import publish_from_manifest

    spec = parse_manifest(textwrap.dedent("""
        [model]
        source = "builtin:tiny-flux"
        [publish.hub]
        repo = "smash/from-manifest"
        private = true
        revision = "exp"
        commit_message = "built by CI"
        """), base_dir=tmp_path)
    result = publish_from_manifest(make_artifact(tmp_path / "art"), spec.publish_hub, token=TOKEN)
    repo = hub.store.repos["smash/from-manifest"]
    assert repo.private and result.revision == "exp" and repo.refs["exp"] == result.commit_sha
    assert repo.commits[result.commit_sha].title == "built by CI"
    assert sha_line(format_publish_result(result)) == result.commit_sha


def sha_line(text: str) -> str:
    return next(line.split()[1] for line in text.splitlines() if line.startswith("commit "))


def test_republish_is_one_commit_that_drops_stale_files(client, tmp_path, hub):
    first = make_artifact(tmp_path / "a", extra={"transformer/old-shard.safetensors": b"\0" * 64})
    publish(first, "smash/republish", token=TOKEN)
    uploads = sum(r["path"].startswith("/_double/lfs-upload/") for r in hub.requests)
    second = make_artifact(tmp_path / "b")  # same weights, no old shard
    result = publish(second, "smash/republish", token=TOKEN, commit_message="v2")
    assert result.deleted == ["transformer/old-shard.safetensors"]
    assert set(hub.files("smash/republish")) == {".gitattributes", *tree_bytes(second)}
    commit = hub.store.repos["smash/republish"].commits[result.commit_sha]
    assert commit.title == "v2"
    # Unchanged LFS content is not sent again.
    assert sum(r["path"].startswith("/_double/lfs-upload/") for r in hub.requests) == uploads


def test_private_flag_on_existing_public_repo_is_refused(client, tmp_path):
    from smash_build.exporters.hub import PublishError

    art = make_artifact(tmp_path / "art")
    publish(art, "smash/public-one", token=TOKEN)
    with pytest.raises(PublishError, match="already exists and is public"):
        publish(art, "smash/public-one", token=TOKEN, private=True)


def test_invalid_model_card_metadata_is_refused_by_the_hub(client, tmp_path):
    from smash_build.exporters.hub import PublishError

    art = make_artifact(tmp_path / "art", card="---\ntags: [unclosed\n---\n# card\n")
    with pytest.raises(PublishError, match="Invalid metadata in README.md"):
        publish(art, "smash/bad-card", token=TOKEN)


def test_publish_rejects_malformed_repo_and_revision(client, tmp_path):
    art = make_artifact(tmp_path / "art")
    with pytest.raises(SettingsError, match="ORG/NAME"):
        publish(art, "no-namespace", token=TOKEN, dry_run=True)
    with pytest.raises(SettingsError, match="without '@REVISION'"):
        publish(art, "smash/x@v2", token=TOKEN, dry_run=True)
    with pytest.raises(SettingsError, match="a branch name"):
        publish(art, "smash/x", revision="a" * 40, token=TOKEN, dry_run=True)


# --- the real round trip: build with the CLI, publish with the CLI, load by repo id ---------

LOAD_BOTH = """
import hashlib, json, sys
from smash_runtime.logs import quiet_third_party_logs
quiet_third_party_logs()
import smash_runtime
from smash_runtime.images import encode_png, generate
out = {}
for ref in json.loads(sys.argv[1]):
    pipe = smash_runtime.load(ref, device="cpu")
    image = generate(pipe, "a red cube on a table", steps=2, height=64, width=64, seed=0)[0]
    out[ref] = [hashlib.sha256(encode_png(image)).hexdigest(), str(pipe.smash.root)]
print(json.dumps(out))
"""


@pytest.mark.slow  # three fresh interpreters (build, publish, load) plus two generations: ~25 s idle
def test_cli_build_publish_then_load_by_repo_id_is_bit_identical(hub, tmp_path):
    repo_root = Path(__file__).resolve().parents[1]
    cli = [sys.executable, "-c", "from smash_build.cli import main; main()"]
    art = tmp_path / "tiny-flux"
    manifest = tmp_path / "tiny-flux.toml"
    manifest.write_text((repo_root / "manifests" / "tiny-flux.toml").read_text()
                        + '\n[publish.hub]\nrepo = "smash/pushed"\ncommit_message = "pushed by the build"\n')
    env = hub.client_env(tmp_path / "hf_publisher", token=TOKEN)
    proc = subprocess.run([*cli, str(manifest), "-o", str(art), "--push"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pushed = hub.head("smash/pushed")
    assert pushed in proc.stdout and hub.store.repos["smash/pushed"].commits[pushed].title == "pushed by the build"

    dry = subprocess.run([*cli, "publish", str(art), "--repo", "smash/tiny-flux", "--dry-run"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "smash/tiny-flux" not in hub.store.repos
    assert WEIGHTS in dry.stdout + dry.stderr
    pub = subprocess.run([*cli, "publish", str(art), "--repo", "smash/tiny-flux", "--message", "tiny flux"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert pub.returncode == 0, pub.stderr[-3000:]
    sha = hub.head("smash/tiny-flux")
    assert sha in pub.stdout + pub.stderr, "the CLI must print the commit sha"
    assert hub.store.repos["smash/tiny-flux"].commits[sha].title == "tiny flux"

    cache = tmp_path / "hf_loader"  # empty: the load must download
    digests, output = run_fresh(LOAD_BOTH, ["smash/tiny-flux", str(art)], hub.client_env(cache))
    assert Path(digests["smash/tiny-flux"][1]).is_relative_to(cache)
    assert digests["smash/tiny-flux"][0] == digests[str(art)][0]
    assert_no_token(proc.stdout, proc.stderr, dry.stdout, dry.stderr, pub.stdout, pub.stderr, output,
                    folders=(art, cache))


# --- the model card a Hub page shows ---------------------------------------------------------

BASE_CARD = """---
license: other
license_name: flux-1-dev-non-commercial-license
license_link: https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md
pipeline_tag: text-to-image
---
# a base model
"""


@pytest.fixture(scope="module")
def built_twice(tmp_path_factory, one_thread):
    """One manifest built into two differently named folders; the source has a licensed model card."""
    from smash_build.tiny_models import build_tiny
    from spine_helpers import build_from_text, manifest_text

    tmp = tmp_path_factory.mktemp("card")
    source = tmp / "base"
    build_tiny("tiny-flux").save_pretrained(source)
    (source / "README.md").write_text(BASE_CARD)
    text = manifest_text(str(source), fuse=True, method="int8wo")
    return (build_from_text(text, tmp / "first-artifact").artifact.path,
            build_from_text(text, tmp / "elsewhere" / "second-artifact").artifact.path)


def test_builds_into_differently_named_folders_are_byte_identical(built_twice):
    first, second = built_twice
    assert first.name != second.name and tree_bytes(first) == tree_bytes(second)
    assert first.name.encode() not in (first / "README.md").read_bytes() + (first / RECORD_FILE).read_bytes()


def test_published_card_loads_the_repo_and_passes_hub_validation(client, hub, built_twice):
    from huggingface_hub import ModelCard

    from smash_build.model_card import card_for_repo

    art = built_twice[0]
    local = tree_bytes(art)
    publish(art, "smash/carded", token=TOKEN, revision="v1", card=card_for_repo)
    text = hub.files("smash/carded", "v1")["README.md"].decode()
    card = ModelCard(text)
    card.validate()  # the Hub's own check (POST /api/validate-yaml), here answered by the double
    data = card.data
    assert (data.license, data.license_name, data.license_link) == (
        "other", "flux-1-dev-non-commercial-license",
        "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md")
    assert data.library_name == "diffusers" and data.pipeline_tag == "text-to-image"
    assert data.tags[:3] == ["diffusers", "torchao", "text-to-image"] and "smash-build" in data.tags
    assert 'smash_runtime.load("smash/carded@v1")' in text and 'pip install "smash-runtime==' in text
    assert tree_bytes(art) == local, "publishing changed the local artifact"
    # The published smash.json lists the published card: the repo loads as a verified artifact.
    root = download_artifact("smash/carded@v1")
    assert (root / "README.md").read_text() == text


def test_a_hand_edited_card_is_published_as_it_is(client, hub, built_twice, tmp_path):
    import shutil

    from smash_build.exporters.artifact import refresh_file_table
    from smash_build.model_card import card_for_repo

    art = tmp_path / "edited"
    shutil.copytree(built_twice[0], art)
    edited = (art / "README.md").read_text() + "\nNotes written by a person.\n"
    (art / "README.md").write_text(edited)
    refresh_file_table(art)
    publish(art, "smash/edited", token=TOKEN, card=card_for_repo)
    assert hub.files("smash/edited")["README.md"].decode() == edited


def test_lora_from_the_hub_is_pinned_to_a_commit_and_recorded(client, hub, tmp_path):
    import hashlib

    pytest.importorskip("peft")
    from huggingface_hub import HfApi

    from smash_build.tiny_models import build_tiny
    from spine_helpers import build_from_text, manifest_text, write_peft_lora

    lora = write_peft_lora(build_tiny("tiny-flux"), tmp_path / "lora.safetensors")
    api = HfApi(token=TOKEN)
    api.create_repo("smash/flux-lora")
    api.upload_file(path_or_fileobj=str(lora), path_in_repo="weights/lora.safetensors", repo_id="smash/flux-lora")
    entry = 'lora = [{ source = "smash/flux-lora", weight_name = "weights/lora.safetensors", scale = 0.5 }]'
    build_from_text(manifest_text().replace("[build]\n", f"[build]\n{entry}\n"), tmp_path / "art")
    record = json.loads((tmp_path / "art" / RECORD_FILE).read_text())["transforms"]["lora"]
    assert record == [{"source": "smash/flux-lora", "weight_name": "weights/lora.safetensors", "scale": 0.5,
                       "revision": "main", "commit": hub.head("smash/flux-lora"),
                       "sha256": hashlib.sha256(lora.read_bytes()).hexdigest()}]
    wrong = entry.replace("weights/lora", "lora")
    with pytest.raises(SettingsError, match=r"build.lora\[0\].weight_name = 'lora.safetensors': no such file"):
        build_from_text(manifest_text().replace("[build]\n", f"[build]\n{wrong}\n"), tmp_path / "art2")
    assert not (tmp_path / "art2").exists()

# --- the trust model on the Hub (docs/trust.md) ---------------------------------------------------

def _hostile_record(files: dict[str, bytes], change) -> dict[str, bytes]:
    record = json.loads(files[RECORD_FILE])
    change(record)
    return {**files, RECORD_FILE: dumps_record(record).encode()}


def _list_outside(rel: str):
    def change(record: dict) -> None:
        record["files"][rel] = {"sha256": "0" * 64, "size": 1}
    return change


def _component_named(name: str):
    def change(record: dict) -> None:
        record["components"][name] = {"library": "diffusers", "class": "AutoencoderKL", "kind": "model"}
    return change


@pytest.mark.parametrize("change,field", [
    (_list_outside("../../../outside/secret"), "files"),
    (_list_outside("/etc/passwd"), "files"),
    (_list_outside("transformer/../../x"), "files"),
    (_component_named("../vae"), "components"),
], ids=["files-dotdot", "files-absolute", "files-inner-dotdot", "component-dotdot"])
def test_hub_artifact_with_traversal_fields_is_refused_before_fetching_more(client, tmp_path, hub, change, field):
    repo = f"smash/hostile-{field}-{len(hub.requests)}"
    hub.seed_repo(repo, _hostile_record(tree_bytes(make_artifact(tmp_path / "art")), change))
    before = len(hub.requests)
    with pytest.raises(ArtifactError, match=rf"not a usable smash-build artifact: .*field {field}") as err:
        download_artifact(repo)
    assert err.value.file == RECORD_FILE and err.value.field.startswith(field)
    fetched = [r["path"] for r in hub.requests[before:] if "/resolve/" in r["path"] or "/tree/" in r["path"]]
    assert fetched and all(path.endswith("/" + RECORD_FILE) for path in fetched), f"fetched more than the record: {fetched}"


def test_hub_cache_symlinks_are_the_one_exception(client, tmp_path, hub):
    """A snapshot's files are symlinks into the same repo's blobs: accepted. Pointed anywhere else: refused."""
    from smash_runtime.format import read_record, verify_files

    hub.seed_repo("smash/linked", tree_bytes(make_artifact(tmp_path / "art", seed=5)))
    hub.seed_repo("smash/other", tree_bytes(make_artifact(tmp_path / "other", seed=6)))
    root = download_artifact("smash/linked")
    other = download_artifact("smash/other")
    assert (root / WEIGHTS).is_symlink() and (root / RECORD_FILE).is_symlink()
    verify_files(root, read_record(root))

    link = root / WEIGHTS
    original = os.readlink(link)
    outside = tmp_path / "outside.bin"
    outside.write_bytes((root / WEIGHTS).read_bytes())  # same bytes: only the location is wrong
    other_blob = (other / WEIGHTS).resolve()  # another repo's blob store in the same cache
    nested = root.parent.parent / "blobs" / "nested"
    nested.mkdir()
    (nested / "x").write_bytes(outside.read_bytes())
    for target in (outside, other_blob, nested / "x"):
        link.unlink()
        os.symlink(target, link)
        with pytest.raises(ArtifactError, match=f"{WEIGHTS}: is a symlink"):
            verify_files(root, read_record(root))
    link.unlink()
    os.symlink(original, link)
    verify_files(root, read_record(root))

    # the same links copied out of the cache point nowhere they may: refused
    copy = tmp_path / "copied"
    shutil.copytree(root, copy, symlinks=True)
    with pytest.raises(ArtifactError, match="is a symlink"):
        verify_files(copy, read_record(root))

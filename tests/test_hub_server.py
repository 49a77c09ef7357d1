"""The local Hub (olah + write stand-in) behaves like the Hub for unmodified huggingface_hub code."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import httpx2
import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    ModelCard,
    RepoFile,
    get_paths_info,
    hf_hub_download,
    list_repo_files,
    model_info,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save

if TYPE_CHECKING:
    from tests.hub_server import HubServer

pytest_plugins = ["tests.hub_server.fixtures"]  # the `hub` fixture, also without conftest
pytestmark = [
    pytest.mark.hub,
    # huggingface_hub 2.4's own LFS PUT (`lfs._upload_single_part`) passes `data=` to httpx2
    pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw:DeprecationWarning"),
]

CARD = "---\nlibrary_name: rvhub\ntags:\n- reasoning-vector\n---\n# A vector\n"


def _weights(seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    return save({"layer.weight": torch.randn(8, 8, generator=generator)})


def _api(hub: HubServer, token: str | None = None) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=token or hub.token)


def _paths(hub: HubServer) -> list[tuple[str, str]]:
    return [(r.method, r.path.split("?")[0]) for r in hub.requests]


def test_create_repo_is_idempotent_with_exist_ok(hub: HubServer) -> None:
    api = _api(hub)
    repo_id = hub.new_repo_id("create")

    url = api.create_repo(repo_id)
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(repo_id)
    again = api.create_repo(repo_id, exist_ok=True)

    assert url.repo_id == again.repo_id == repo_id
    assert conflict.value.response.status_code == 409
    assert api.repo_exists(repo_id)
    assert api.list_repo_files(repo_id) == [".gitattributes"]  # the Hub's first commit
    assert api.whoami()["name"] == hub.user
    api.delete_repo(repo_id)
    assert not api.repo_exists(repo_id)


def test_pushed_folder_downloads_back_byte_identical(hub: HubServer, tmp_path: Path) -> None:
    api = _api(hub)
    repo_id = hub.new_repo_id("push")
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "vector.safetensors").write_bytes(_weights(0))
    (folder / "README.md").write_text(CARD)
    (folder / "rvhub.json").write_text('{"format": "rvhub"}')
    api.create_repo(repo_id)

    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="add vector")
    snapshot = Path(snapshot_download(repo_id))

    for name in ("vector.safetensors", "README.md", "rvhub.json"):
        assert (snapshot / name).read_bytes() == (folder / name).read_bytes()
    assert ("PUT", f"/_standin/lfs/model/{repo_id}/") in [
        (m, p.rsplit("/", 1)[0] + "/") for m, p in _paths(hub)
    ]
    weights, card = get_paths_info(repo_id, ["vector.safetensors", "README.md"])
    assert isinstance(weights, RepoFile) and isinstance(card, RepoFile)
    assert weights.lfs is not None
    assert weights.lfs.size == (folder / "vector.safetensors").stat().st_size
    assert card.lfs is None
    assert sorted(list_repo_files(repo_id)) == [
        ".gitattributes",
        "README.md",
        "rvhub.json",
        "vector.safetensors",
    ]
    assert model_info(repo_id, revision=commit.oid).sha == commit.oid
    card_data = model_info(repo_id).card_data
    assert card_data is not None and card_data.library_name == "rvhub"
    assert ModelCard.load(repo_id).data.tags == ["reasoning-vector"]
    assert [c.authors for c in api.list_repo_commits(repo_id)] == [[hub.user], [hub.user]]
    only_card = Path(snapshot_download(repo_id, allow_patterns=["*.md"], cache_dir=tmp_path / "c2"))
    assert sorted(p.name for p in only_card.iterdir()) == ["README.md"]


def test_download_by_commit_sha_gets_that_commits_content(hub: HubServer) -> None:
    repo_id = hub.new_repo_id("history", namespace="org")
    first = hub.seed_repo(repo_id, {"model.safetensors": _weights(1), "config.json": '{"v": 1}'})
    hub.seed_repo(repo_id, {"model.safetensors": _weights(2), "config.json": '{"v": 2}'})

    old = Path(hf_hub_download(repo_id, "model.safetensors", revision=first))
    old_snapshot = Path(snapshot_download(repo_id, revision=first))
    latest = Path(hf_hub_download(repo_id, "config.json"))

    assert old.read_bytes() == _weights(1)
    assert (old_snapshot / "config.json").read_text() == '{"v": 1}'
    assert latest.read_text() == '{"v": 2}'
    assert old.parent.name == first  # the cache keys snapshots by commit sha


def test_reuploading_identical_files_makes_no_commit(hub: HubServer) -> None:
    api = _api(hub)
    repo_id = hub.new_repo_id("same")
    api.create_repo(repo_id)

    def operations() -> list[CommitOperationAdd]:
        return [
            CommitOperationAdd("vector.safetensors", _weights(3)),
            CommitOperationAdd("README.md", CARD.encode()),
        ]

    first = api.create_commit(repo_id, operations(), commit_message="v1")
    hub.requests.clear()
    second = api.create_commit(repo_id, operations(), commit_message="v1 again")

    # preupload reports each file's remote oid (sha256 for LFS, git blob sha1 otherwise), the
    # client drops unchanged files and, with nothing left, skips the commit.
    assert second.oid == first.oid
    assert not [p for m, p in _paths(hub) if m == "PUT" or p.endswith("/commit/main")]
    assert len(api.list_repo_commits(repo_id)) == 2


def test_commit_on_stale_parent_is_refused_and_pr_commits_are_readable(hub: HubServer) -> None:
    api = _api(hub)
    repo_id = hub.new_repo_id("parent")
    api.create_repo(repo_id)
    base = api.create_commit(repo_id, [CommitOperationAdd("a.txt", b"a")], commit_message="a").oid
    api.create_commit(repo_id, [CommitOperationAdd("b.txt", b"b")], commit_message="b")

    with pytest.raises(HfHubHTTPError) as stale:
        api.create_commit(
            repo_id, [CommitOperationAdd("c.txt", b"c")], commit_message="c", parent_commit=base
        )
    pr = api.create_commit(
        repo_id, [CommitOperationAdd("c.txt", b"c")], commit_message="c", create_pr=True
    )

    assert stale.value.response.status_code == 412
    assert pr.pr_revision == "refs/pr/1"
    assert Path(hf_hub_download(repo_id, "c.txt", revision=pr.pr_revision)).read_bytes() == b"c"
    assert "c.txt" not in list_repo_files(repo_id)  # main is untouched


def test_writes_need_a_token_of_the_namespace(hub: HubServer) -> None:
    repo_id = hub.new_repo_id("auth")
    _api(hub).create_repo(repo_id)
    add = [CommitOperationAdd("x.txt", b"x")]

    with pytest.raises(HfHubHTTPError) as anonymous:
        HfApi(endpoint=hub.endpoint, token=False).create_commit(repo_id, add, commit_message="x")
    with pytest.raises(HfHubHTTPError) as bad_token:
        _api(hub, "hf_not_a_token").create_commit(repo_id, add, commit_message="x")
    with pytest.raises(HfHubHTTPError) as other_user:
        _api(hub, hub.other_token).create_commit(repo_id, add, commit_message="x")
    with pytest.raises(HfHubHTTPError) as other_namespace:
        _api(hub, hub.other_token).create_repo(hub.new_repo_id("auth", namespace=hub.user))

    assert anonymous.value.response.status_code == 401
    assert bad_token.value.response.status_code == 401
    assert other_user.value.response.status_code == 403
    assert other_namespace.value.response.status_code == 403
    assert (
        _api(hub)
        .create_repo(hub.new_repo_id("auth", namespace=hub.org))
        .repo_id.startswith(f"{hub.org}/")
    )
    assert list_repo_files(repo_id) == [".gitattributes"]


def test_private_repo_is_visible_to_its_owner_only(hub: HubServer) -> None:
    repo_id = hub.new_repo_id("private")
    _api(hub).create_repo(repo_id, private=True)

    assert _api(hub).model_info(repo_id).private is True
    with pytest.raises(RepositoryNotFoundError):
        _api(hub, hub.other_token).model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", token=False)


def test_missing_repo_revision_and_file_raise_the_hubs_errors(hub: HubServer) -> None:
    repo_id = hub.new_repo_id("errors")
    hub.seed_repo(repo_id, {"config.json": "{}"})

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(hub.new_repo_id("absent"), "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "adapter_config.json")
    with pytest.raises(RepositoryNotFoundError):
        model_info(hub.new_repo_id("absent"))


def test_dead_endpoint_fails_fast_with_a_connection_error(hub: HubServer) -> None:
    with pytest.raises(httpx2.ConnectError):
        HfApi(endpoint=hub.dead_endpoint, token=hub.token).model_info("alice/anything")


def test_cache_serves_downloads_offline_and_with_the_network_down(hub: HubServer) -> None:
    repo_id = hub.new_repo_id("offline")
    hub.seed_repo(repo_id, {"model.safetensors": _weights(4), "README.md": CARD})
    online = Path(snapshot_download(repo_id))
    hub.requests.clear()

    with hub.offline():
        offline_file = Path(hf_hub_download(repo_id, "model.safetensors"))
        offline_snapshot = Path(snapshot_download(repo_id))
    with hub.use_endpoint(Path(online).parents[3], endpoint=hub.dead_endpoint):
        network_down = Path(hf_hub_download(repo_id, "README.md"))

    assert hub.requests == []
    assert offline_file.read_bytes() == _weights(4)
    assert offline_snapshot == online
    assert network_down.read_text() == CARD


@pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs is not installed")
def test_pushed_weights_are_valid_git_lfs_objects(hub: HubServer) -> None:
    api = _api(hub)
    repo_id = hub.new_repo_id("lfs")
    api.create_repo(repo_id)
    api.create_commit(
        repo_id, [CommitOperationAdd("vector.safetensors", _weights(5))], commit_message="w"
    )
    repo = hub.repo(repo_id).path

    listed = subprocess.run(
        ["git", "lfs", "ls-files"], cwd=repo, capture_output=True, text=True, check=True
    )
    fsck = subprocess.run(["git", "lfs", "fsck"], cwd=repo, capture_output=True, text=True)

    assert listed.stdout.split()[-1] == "vector.safetensors"
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

"""patchkit.share.hub against a local fake Hub (tests/fakehub.py), with the real huggingface_hub client.

The client is not patched: it is pointed at the fake server with HF_ENDPOINT (which patchkit.share.hub reads at
each call), and its cache at a temporary HF_HOME. No traffic leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from fakehub import FakeHub  # noqa: E402

from patchkit.core.patchfile import Patch, make_edit  # noqa: E402
from patchkit.core.stfile import serialize  # noqa: E402
from patchkit.errors import CheckpointError, HubError, PatchFormatError  # noqa: E402
from patchkit.share import download as D  # noqa: E402
from patchkit.share import hub as H  # noqa: E402
from patchkit.share import push as P  # noqa: E402
from patchkit.share.card import render_card  # noqa: E402

TOKEN = "hf_fake_token"


# ---- fixtures and helpers ------------------------------------------------------------------------------
@pytest.fixture
def hub(tmp_path, monkeypatch):
    fh = FakeHub({TOKEN: "me", "hf_other": "other"}).start()
    assert fh.url.startswith("http://127.0.0.1:")
    monkeypatch.setenv("HF_ENDPOINT", fh.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN",
                "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert H.endpoint() == fh.url
    yield fh
    fh.stop()


def make_patch(path: Path, seed: int = 0, *, base_model="org/base", evaluation=None, description="steer towards calm",
               provenance=None) -> Patch:
    rng = np.random.default_rng(seed)
    rows = np.array([1, 3], dtype=np.int64)
    base = rng.standard_normal((2, 4)).astype(np.float32)
    delta = rng.standard_normal((2, 4)).astype(np.float32)
    edit = make_edit("model.layers.0.mlp.down_proj.weight", (8, 4), "F32", rows,
                     base.view(np.uint8).reshape(2, 16), delta=delta)
    p = Patch(
        {edit.name: edit}, base_model=base_model, base_revision="a" * 40,
        provenance=provenance if provenance is not None else
        {"method": "steer", "params": {"alpha": 2.0, "layer": 0}, "license": "apache-2.0"},
        evaluation=evaluation if evaluation is not None else {"accuracy": 0.9, "n": 100},
        description=description,
    )
    p.save(path)
    return p


def plain_safetensors(seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).standard_normal((4, 4)).astype(np.float32)
    return serialize({"w": ("F32", arr)}, {"format": "pt"})


def front_matter(readme: bytes) -> dict:
    text = readme.decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def cache_files(tmp_path: Path) -> list[Path]:
    root = tmp_path / "hf" / "hub"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.fixture
def pushed(hub, tmp_path):
    p = make_patch(tmp_path / "calm.safetensors")
    r = P.push_patch(tmp_path / "calm.safetensors", "me/calm")
    return p, r


# ---- push ------------------------------------------------------------------------------------------------
def test_push_creates_repo_and_one_commit_with_two_files(hub, tmp_path):
    p = make_patch(tmp_path / "calm.safetensors")
    hub.clear_log()
    r = P.push_patch(tmp_path / "calm.safetensors", "me/calm")
    repo = hub.repos["me/calm"]
    history = repo.history()
    assert len(history) == 2  # the repo's initial commit (.gitattributes) and the push
    assert history[0].added == ["README.md", "calm.safetensors"] and history[0].deleted == []
    assert r == {"repo": "me/calm", "revision": "main", "commit": history[0].oid, "url": r["url"], "pr_url": None,
                 "path": "calm.safetensors", "id": p.id, "ref": "hf://me/calm"}
    assert history[0].oid in r["url"]
    commits = [q for q in hub.requests if q.method == "POST" and "/commit/" in q.path]
    assert len(commits) == 1 and all(q.token == TOKEN for q in hub.requests)
    assert hub.files("me/calm")["calm.safetensors"] == (tmp_path / "calm.safetensors").read_bytes()

    readme = hub.files("me/calm")["README.md"]
    fm = front_matter(readme)
    assert fm["base_model"] == "org/base"
    assert fm["library_name"] == "patchkit"
    assert {"patchkit", "model-surgery"} <= set(fm["tags"])
    assert fm["license"] == "apache-2.0"
    body = readme.decode()
    assert "patchkit apply hf://me/calm MODEL_DIR -o OUT" in body
    assert "patchkit revert hf://me/calm OUT -o RESTORED" in body
    assert "| accuracy | 0.9 |" in body and "| n | 100 |" in body
    assert "steer" in body and '"alpha": 2.0' in body and p.id in body
    assert "| tensors touched | 1 |" in body and "| rows touched | 2 |" in body


def test_push_to_existing_repo_new_branch_and_pr(hub, tmp_path, pushed):
    p2 = make_patch(tmp_path / "calm.safetensors", seed=1)
    r = P.push_patch(tmp_path / "calm.safetensors", "me/calm", revision="v2")
    assert r["revision"] == "v2" and hub.repos["me/calm"].refs["v2"] == r["commit"]
    assert "patchkit apply hf://me/calm@v2 MODEL_DIR" in hub.files("me/calm", "v2")["README.md"].decode()
    assert Patch.load(D.download_patch("hf://me/calm@v2")).id == p2.id
    assert Patch.load(D.download_patch("hf://me/calm")).id == pushed[0].id

    r = P.push_patch(tmp_path / "calm.safetensors", "me/calm", create_pr=True)
    assert r["pr_url"].endswith("/discussions/1") and r["ref"] == "hf://me/calm@refs/pr/1"
    assert Patch.load(D.download_patch("hf://me/calm@refs/pr/1")).id == p2.id
    assert Patch.load(D.download_patch("hf://me/calm")).id == pushed[0].id  # main untouched


def test_push_private_and_card_without_hub_base(hub, tmp_path):
    make_patch(tmp_path / "p.safetensors", base_model="/data/models/local", evaluation={}, provenance={"method": "diff"})
    P.push_patch(tmp_path / "p.safetensors", "me/secret", private=True)
    assert hub.repos["me/secret"].private
    fm = front_matter(hub.files("me/secret")["README.md"])
    assert "base_model" not in fm and "license" not in fm and fm["library_name"] == "patchkit"
    assert "## Evaluation" not in hub.files("me/secret")["README.md"].decode()


def test_push_errors(hub, tmp_path, monkeypatch):
    make_patch(tmp_path / "p.safetensors")
    with pytest.raises(HubError, match="permission denied on other/x"):
        P.push_patch(tmp_path / "p.safetensors", "other/x")
    assert "other/x" not in hub.repos
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(HubError, match="rejected the token"):
        P.push_patch(tmp_path / "p.safetensors", "me/x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set: cannot push"):
        P.push_patch(tmp_path / "p.safetensors", "me/x")
    (tmp_path / "bad.safetensors").write_bytes(plain_safetensors())
    with pytest.raises(PatchFormatError, match="not a patchkit patch"):
        P.push_patch(tmp_path / "bad.safetensors", "me/x")
    assert "me/x" not in hub.repos


# ---- download_patch --------------------------------------------------------------------------------------
def test_download_with_and_without_path_and_revision(hub, tmp_path, pushed):
    p, r = pushed
    local = D.download_patch("hf://me/calm")
    assert Patch.load(local).id == p.id
    assert Path(os.path.realpath(local)).is_relative_to(os.path.realpath(tmp_path / "hf" / "hub"))
    assert Patch.load(D.download_patch("hf://me/calm/calm.safetensors")).id == p.id
    assert Patch.load(D.download_patch(f"hf://me/calm@{r['commit']}")).id == p.id
    assert Patch.load(D.download_patch(f"hf://me/calm/calm.safetensors@{r['commit']}")).id == p.id
    # a patch in a sub folder, on a tag
    data = (tmp_path / "calm.safetensors").read_bytes()
    hub.add_files("me/calm", {"v1/calm.safetensors": data}, branch="main", tag="v1.0")
    assert Patch.load(D.download_patch("hf://me/calm/v1/calm.safetensors@v1.0")).id == p.id
    # through sources.resolve_patch, as every command does
    from patchkit.share.sources import resolve_patch

    assert Patch.load(resolve_patch("hf://me/calm/calm.safetensors")).id == p.id


def test_default_path_skips_non_patch_safetensors_and_lists_several(hub, tmp_path):
    p = make_patch(tmp_path / "a.safetensors", seed=0)
    make_patch(tmp_path / "b.safetensors", seed=1)
    hub.add_files("me/mixed", {"model.safetensors": plain_safetensors(), "a.safetensors": (tmp_path / "a.safetensors").read_bytes()})
    assert Patch.load(D.download_patch("hf://me/mixed")).id == p.id
    assert "model.safetensors" not in hub.downloads("me/mixed")  # only its header was read (ranged GET)
    assert any(q.range == "bytes=0-100000" and q.path.endswith("/model.safetensors") for q in hub.requests)

    hub.add_files("me/mixed", {"sub/b.safetensors": (tmp_path / "b.safetensors").read_bytes()})
    with pytest.raises(HubError, match=r"holds 2 patches \(a.safetensors, sub/b.safetensors\): name one"):
        D.download_patch("hf://me/mixed")
    assert Patch.load(D.download_patch("hf://me/mixed/sub/b.safetensors")).id != p.id

    hub.add_files("me/none", {"config.json": b"{}"})
    with pytest.raises(HubError, match="holds no .safetensors file"):
        D.download_patch("hf://me/none")
    hub.add_files("me/plain", {"model.safetensors": plain_safetensors(), "other.safetensors": plain_safetensors(1)})
    with pytest.raises(HubError, match="none is a patchkit patch"):
        D.download_patch("hf://me/plain")
    with pytest.raises(PatchFormatError, match="not a patchkit patch"):
        D.download_patch("hf://me/plain/model.safetensors")


def test_tampered_file_is_refused_and_evicted(hub, tmp_path, pushed):
    p, _ = pushed
    good = (tmp_path / "calm.safetensors").read_bytes()
    other = make_patch(tmp_path / "other.safetensors", seed=5).to_bytes()
    forged = other.replace(Patch.load(tmp_path / "other.safetensors").id.encode(), p.id.encode())
    assert Patch.load(tmp_path / "other.safetensors").id.encode() in other and len(forged) == len(other)
    hub.tamper("me/calm", "calm.safetensors", forged)
    with pytest.raises(PatchFormatError, match="content id does not match.*removed from the HF cache"):
        D.download_patch("hf://me/calm/calm.safetensors")
    assert not [f for f in cache_files(tmp_path) if f.parent.name == "blobs"]
    hub.tamper("me/calm", "calm.safetensors", good)  # the mirror is repaired: a retry downloads again
    assert Patch.load(D.download_patch("hf://me/calm/calm.safetensors")).id == p.id


def test_offline_uses_the_cache(hub, tmp_path, pushed, monkeypatch):
    p, _ = pushed
    D.download_patch("hf://me/calm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.clear_log()
    assert Patch.load(D.download_patch("hf://me/calm")).id == p.id
    assert Patch.load(D.download_patch("hf://me/calm/calm.safetensors")).id == p.id
    with pytest.raises(HubError, match=r"HF_HUB_OFFLINE is set and hf://me/calm@v9 is not in the cache .*nothing was written"):
        D.download_patch("hf://me/calm@v9")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set and hf://me/never is not in the cache"):
        D.download_patch("hf://me/never")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set and hf://me/never/p.safetensors is not in the cache"):
        D.download_patch("hf://me/never/p.safetensors")
    assert hub.requests == []  # not one request


def test_network_unreachable(hub, tmp_path, pushed, monkeypatch):
    p, _ = pushed
    D.download_patch("hf://me/calm")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()  # nothing listens there: connection refused
    monkeypatch.setenv("HF_ENDPOINT", dead)
    assert Patch.load(D.download_patch("hf://me/calm")).id == p.id  # from the cache
    with pytest.raises(HubError, match=r"network unreachable \(http://127.0.0.1:\d+\) and hf://me/other is not in the cache.*: nothing was written"):
        D.download_patch("hf://me/other")
    with pytest.raises(HubError, match="network unreachable"):
        D.download_patch("hf://me/other/p.safetensors")
    with pytest.raises(HubError, match="network unreachable .*nothing was pushed"):
        P.push_patch(tmp_path / "calm.safetensors", "me/calm")


@pytest.mark.parametrize("setup, ref, message", [
    (lambda h: None, "hf://me/missing", r"repository me/missing not found \(or you have no access: set HF_TOKEN\)"),
    (lambda h: None, "hf://me/missing/p.safetensors", r"repository me/missing not found \(or you have no access"),
    (lambda h: h.create("me/gated", gated=True), "hf://me/gated", "me/gated is a gated repository"),
    (lambda h: h.create("me/gated", gated=True), "hf://me/gated/p.safetensors", "me/gated is a gated repository"),
    (lambda h: h.create("me/r"), "hf://me/r@v2", "revision v2 not found in me/r"),
    (lambda h: h.create("me/r"), "hf://me/r/p.safetensors@v2", "revision v2 not found in me/r"),
    (lambda h: h.create("me/r"), "hf://me/r/p.safetensors", "file p.safetensors not found in me/r at revision main"),
    (lambda h: h.create("other/private", private=True), "hf://other/private", r"repository other/private not found"),
])
def test_errors(hub, tmp_path, setup, ref, message):
    setup(hub)
    with pytest.raises(HubError, match=message):
        D.download_patch(ref)
    assert not [f for f in cache_files(tmp_path) if f.parent.name == "blobs"]


def test_private_repo_needs_a_token(hub, tmp_path, monkeypatch):
    p = make_patch(tmp_path / "p.safetensors")
    P.push_patch(tmp_path / "p.safetensors", "me/private", private=True)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf2"))  # no saved login there either
    with pytest.raises(HubError, match=r"repository me/private not found \(or you have no access: set HF_TOKEN\)"):
        D.download_patch("hf://me/private")
    with pytest.raises(HubError, match=r"repository me/private not found"):
        D.download_patch("hf://me/private/p.safetensors")
    assert any(q.token is None and q.path.startswith("/api/models/me/private") for q in hub.requests)
    monkeypatch.setenv("HF_TOKEN", "hf_bogus")
    with pytest.raises(HubError, match="rejected the token"):
        D.download_patch("hf://me/private")
    assert Patch.load(D.download_patch("hf://me/private", token=TOKEN)).id == p.id


def test_dropped_connection_leaves_nothing_and_a_retry_succeeds(hub, tmp_path, pushed):
    p, _ = pushed
    hub.fail_download("me/calm", "calm.safetensors", mode="reset", after=100)
    with pytest.raises(HubError, match="connection to the Hub lost while downloading hf://me/calm/calm.safetensors .*nothing was written"):
        D.download_patch("hf://me/calm/calm.safetensors")
    leftovers = [f for f in cache_files(tmp_path) if f.parent.name in ("blobs", "snapshots") or "incomplete" in f.name]
    assert leftovers == []
    assert not list((tmp_path / "hf" / "hub").rglob("calm.safetensors"))
    assert Patch.load(D.download_patch("hf://me/calm/calm.safetensors")).id == p.id


def test_clean_close_mid_body_is_retried_by_the_client(hub, tmp_path, pushed):
    p, _ = pushed
    hub.fail_download("me/calm", "calm.safetensors", mode="close", after=100)
    hub.clear_log()
    assert Patch.load(D.download_patch("hf://me/calm/calm.safetensors")).id == p.id
    gets = [q for q in hub.requests if q.method == "GET" and q.path.endswith("/calm.safetensors")]
    # the client retried by itself: the 100 bytes never filled one read chunk, so it starts again from 0
    # (a resume sends "Range: bytes=N-", which the fake Hub answers with 206)
    assert len(gets) == 2 and all(q.range in (None, "bytes=100-") for q in gets)


# ---- models ----------------------------------------------------------------------------------------------
def _seed_model(hub) -> str:
    shards = {
        "model-00001-of-00003.safetensors": serialize({"model.embed_tokens.weight": ("F32", np.ones((4, 2), np.float32))}, {"format": "pt"}),
        "model-00002-of-00003.safetensors": serialize({"model.layers.0.mlp.down_proj.weight": ("F32", np.ones((8, 4), np.float32))}, {"format": "pt"}),
        "model-00003-of-00003.safetensors": serialize({"lm_head.weight": ("F32", np.ones((4, 2), np.float32))}, {"format": "pt"}),
    }
    weight_map = {}
    for name, data in shards.items():
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        weight_map.update({t: name for t in header if t != "__metadata__"})
    files = dict(shards)
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    files.update({"config.json": b'{"model_type": "llama"}', "tokenizer.json": b'{"t": 1}', "tokenizer_config.json": b'{"t": 2}',
                  "generation_config.json": b'{"g": 1}', "chat_template.jinja": b"{{ x }}", "pytorch_model.bin": b"x" * 10,
                  "README.md": b"# base", "training_args.bin": b"y"})
    return hub.add_files("org/base", files)


def test_download_model_fetches_only_needed_shards(hub, tmp_path):
    commit = _seed_model(hub)
    files = D.model_files_for("org/base", ["model.layers.0.mlp.down_proj.weight"])
    assert files == ["model-00002-of-00003.safetensors"]
    hub.clear_log()
    folder = D.download_model("org/base", allow_patterns=files)
    assert folder.name == commit and D.RESOLVED["org/base"] == commit
    assert D.resolved_revision("org/base") == commit
    got = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    expected = ["chat_template.jinja", "config.json", "generation_config.json", "model-00002-of-00003.safetensors",
                "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]
    assert got == expected
    # what the server was asked for (the index was fetched by model_files_for already)
    assert sorted(hub.downloads("org/base")) == [f for f in expected if f != "model.safetensors.index.json"]
    assert not [q for q in hub.requests if "model-00001" in q.path or "model-00003" in q.path or ".bin" in q.path]

    full = D.download_model("org/base")  # all weights
    assert sorted(p.name for p in full.glob("*.safetensors")) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (full / "pytorch_model.bin").exists() and not (full / "README.md").exists()

    with pytest.raises(CheckpointError, match="names no tensor nope"):
        D.model_files_for("org/base", ["nope"])
    with pytest.raises(HubError, match="revision v3 not found in org/base"):
        D.download_model("org/base@v3")
    with pytest.raises(HubError, match="repository org/none not found"):
        D.download_model("org/none")
    with pytest.raises(HubError, match="org/base is a gated repository"):
        hub.repos["org/base"].gated = True
        D.resolved_revision("org/base@main")


def test_download_model_unsharded_revision_and_offline(hub, tmp_path, monkeypatch):
    first = hub.add_files("org/small", {"model.safetensors": plain_safetensors(), "config.json": b"{}"}, tag="v1")
    second = hub.add_files("org/small", {"model.safetensors": plain_safetensors(1)})
    assert D.model_files_for("org/small", ["w"]) == ["model.safetensors"]
    assert D.download_model("org/small@v1").name == first
    assert D.resolved_revision("org/small@v1") == first and D.resolved_revision("org/small") == second
    folder = D.download_model("org/small")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.clear_log()
    assert D.download_model("org/small") == folder
    assert D.resolved_revision("org/small") == second
    assert D.model_files_for("org/small", ["w"]) == ["model.safetensors"]
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        D.download_model("org/other")
    assert hub.requests == []


# ---- push_checkpoint -------------------------------------------------------------------------------------
def test_push_checkpoint_uploads_only_changed_shards(hub, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for i in (1, 2, 3):
        (base / f"model-0000{i}-of-00003.safetensors").write_bytes(plain_safetensors(i))
    (base / "model.safetensors.index.json").write_text("{}")
    (base / "config.json").write_text("{}")
    r = P.push_checkpoint(base, "me/release")
    assert sorted(r["uploaded"]) == sorted(["config.json", "model.safetensors.index.json", "README.md"]
                                           + [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)])
    out = tmp_path / "out"
    out.mkdir()
    for f in base.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    (out / "model-00002-of-00003.safetensors").write_bytes(plain_safetensors(99))
    (out / ".patchkit").mkdir()
    (out / ".patchkit" / "state.json").write_text("{}")
    p = make_patch(tmp_path / "p.safetensors")
    r = P.push_checkpoint(out, "me/release", patches=[tmp_path / "p.safetensors"])
    assert r["uploaded"] == ["model-00002-of-00003.safetensors", "README.md"]
    last = hub.repos["me/release"].history()[0]
    assert last.added == ["README.md", "model-00002-of-00003.safetensors"]
    assert ".patchkit/state.json" not in hub.files("me/release")
    readme = hub.files("me/release")["README.md"].decode()
    assert p.id[:12] in readme and front_matter(readme.encode())["base_model"] == "org/base"


# ---- references and card ---------------------------------------------------------------------------------
def test_reference_parsing():
    assert H.parse_patch_ref("hf://me/x") == ("me/x", None, None)
    assert H.parse_patch_ref("hf://me/x/a/b.safetensors@v2") == ("me/x", "a/b.safetensors", "v2")
    assert H.parse_patch_ref("hf://me/x@refs/pr/3") == ("me/x", None, "refs/pr/3")
    assert H.parse_model_ref("org/m@" + "b" * 40) == ("org/m", "b" * 40)
    for bad in ("hf://me", "hf://me/x@", "hf:///x", "hf://me/x/../y", "hf://a b/c"):
        with pytest.raises(HubError):
            H.parse_patch_ref(bad)


def test_card_lists_many_tensors_and_nested_eval(tmp_path):
    p = make_patch(tmp_path / "p.safetensors", evaluation={"toxicity": {"before": 0.3, "after": 0.1}, "ppl": 12.5})
    text = render_card(p, "me/calm", "p.safetensors", "v2", explicit_path=True)
    assert "| toxicity.before | 0.3 |" in text and "| toxicity.after | 0.1 |" in text
    assert "patchkit apply hf://me/calm/p.safetensors@v2 MODEL_DIR -o OUT" in text
    assert yaml.safe_load(text.split("---\n")[1])["tags"][:2] == ["patchkit", "model-surgery"]


def test_cli_inspect_hf_ref_and_error_exit_code(hub, tmp_path, pushed):
    from click.testing import CliRunner

    from patchkit.cli import cli

    p, _ = pushed
    r = CliRunner().invoke(cli, ["inspect", "hf://me/calm", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["id"] == p.id
    r = CliRunner().invoke(cli, ["inspect", "hf://me/missing"])
    assert r.exit_code == HubError.exit_code
    assert "error: repository me/missing not found (or you have no access: set HF_TOKEN)" in r.output


# ---- the command line, end to end --------------------------------------------------------------------------
def test_cli_push_then_apply_from_hub_and_push_release(hub, tmp_path):
    """push a patch; inspect and apply it by hf:// reference; publish the patched checkpoint with --push."""
    import helpers
    import torch
    from click.testing import CliRunner

    from patchkit.cli import cli
    from patchkit.core.checkpoint import Checkpoint
    from patchkit.core.patchfile import Patch, make_edit

    base = helpers.tiny_llama(tmp_path / "base", torch.bfloat16, sharded=True)
    ck = Checkpoint(base)
    name = "model.layers.1.mlp.gate_proj.weight"
    info = ck.info(name)
    rows = np.array([2, 5, 9], dtype=np.int64)
    delta = np.full((3, info.n_cols), 0.25, dtype=np.float32)
    Patch(edits={name: make_edit(name, info.shape, info.dtype, rows, ck.read_rows(name, rows), delta=delta)},
          base_model="org/tiny").save(tmp_path / "fix.safetensors")
    run = CliRunner()
    r = run.invoke(cli, ["push", str(tmp_path / "fix.safetensors"), "me/fix", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["repo"] == "me/fix"
    r = run.invoke(cli, ["inspect", "hf://me/fix", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rows"] == 3
    # the base is already on the Hub: the release upload sends only the touched shard and the card
    P.push_checkpoint(base, "me/release")
    r = run.invoke(cli, ["apply", "hf://me/fix", str(base), "-o", str(tmp_path / "out"), "--push", "me/release", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    touched = str(ck.info(name).file.name)
    assert sorted(out["push"]["uploaded"]) == sorted([touched, "README.md"])
    assert hub.files("me/release")[touched] == (tmp_path / "out" / touched).read_bytes()
    r = run.invoke(cli, ["revert", "hf://me/fix", str(tmp_path / "out"), "--in-place"])
    assert r.exit_code == 0, r.output
    r = run.invoke(cli, ["apply", "hf://me/missing", str(base), "-o", str(tmp_path / "o2")])
    assert r.exit_code != 0 and "Traceback" not in r.output and not (tmp_path / "o2").exists()


def test_cli_hub_model_ids_for_apply_and_compute(hub, tmp_path):
    import helpers
    import torch
    from click.testing import CliRunner

    from patchkit.cli import cli
    from patchkit.core.checkpoint import Checkpoint
    from patchkit.method.probefile import ProbeArrays, write_probe

    base = helpers.tiny_llama(tmp_path / "base", torch.bfloat16, sharded=True)
    P.push_checkpoint(base, "me/tinybase")
    ck = Checkpoint(base)
    rng = np.random.default_rng(0)
    probe = ProbeArrays(rng.standard_normal((2, 32)).astype(np.float32), np.zeros(2, np.float32),
                        {"behavior_index": 1, "label_names": ["ok", "bad"], "model_fingerprint": ck.fingerprint()})
    write_probe(tmp_path / "p.safetensors", probe)
    run = CliRunner()
    r = run.invoke(cli, ["compute", "me/tinybase", "--probe", str(tmp_path / "p.safetensors"), "-o", str(tmp_path / "x.safetensors"),
                         "--top-k", "6", "--json"])
    assert r.exit_code == 0, r.output
    from patchkit.core.patchfile import Patch

    patch = Patch.load(tmp_path / "x.safetensors")
    assert patch.base_model == "me/tinybase" and len(patch.base_revision) == 40  # the resolved commit
    r = run.invoke(cli, ["apply", str(tmp_path / "x.safetensors"), "me/tinybase", "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    r2 = run.invoke(cli, ["apply", str(tmp_path / "x.safetensors"), str(base), "-o", str(tmp_path / "local")])
    assert r2.exit_code == 0, r2.output
    for f in ck.files:
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "local" / f).read_bytes()
    r = run.invoke(cli, ["apply", str(tmp_path / "x.safetensors"), "me/tinybase", "--in-place"])
    assert r.exit_code == 2 and "Hub model id" in r.output


def test_compute_on_a_hub_model_fetches_only_the_target_shards(hub, tmp_path, monkeypatch):
    """probe OWNER/NAME records the commit; compute OWNER/NAME then downloads config, index and the
    shards holding gate_proj only, and gives the same edit as compute on a full local copy."""
    import helpers
    import torch
    from click.testing import CliRunner

    from patchkit.cli import cli
    from patchkit.core.checkpoint import Checkpoint
    from patchkit.core.patchfile import Patch

    model = helpers.make_model(helpers.llama_config(), seed=4, dtype=torch.bfloat16)
    base = helpers.save_checkpoint(model, tmp_path / "base", shard_size="12KB")
    ck = Checkpoint(base)
    gate_files = {ck.index[n] for n in ck.index if n.endswith("mlp.gate_proj.weight")}
    assert len(ck.files) > len(gate_files)  # some shards hold no gate_proj: they must not be fetched
    P.push_checkpoint(base, "me/sharded")
    data = tmp_path / "d.jsonl"
    bad = [f"{a} {b}" for a in ("hate", "cruel", "awful") for b in ("people", "the group")]
    good = [f"{a} {b}" for a in ("love", "kind", "nice") for b in ("people", "the group")]
    data.write_text("".join(json.dumps({"text": t, "label": int(t in bad)}) + "\n" for t in bad + good))
    monkeypatch.setenv("PATCHKIT_CACHE", str(tmp_path / "pk-cache"))
    run = CliRunner()
    r = run.invoke(cli, ["probe", "me/sharded", "--data", str(data), "-o", str(tmp_path / "p.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf2"))  # an empty cache: compute downloads what it needs
    hub.clear_log()
    r = run.invoke(cli, ["compute", "me/sharded", "--probe", str(tmp_path / "p.safetensors"), "-o", str(tmp_path / "x.safetensors"),
                         "--top-k", "9"])
    assert r.exit_code == 0, r.output
    fetched = {f for f in hub.downloads("me/sharded") if f.endswith(".safetensors")}
    assert fetched == gate_files
    remote = Patch.load(tmp_path / "x.safetensors")
    r = run.invoke(cli, ["compute", str(base), "--probe", str(tmp_path / "p.safetensors"), "-o", str(tmp_path / "y.safetensors"),
                         "--top-k", "9"])
    assert r.exit_code == 0, r.output
    local = Patch.load(tmp_path / "y.safetensors")
    assert {n: e.rows.tolist() for n, e in remote.edits.items()} == {n: e.rows.tolist() for n, e in local.edits.items()}
    assert remote.base_model == "me/sharded" and len(remote.base_revision) == 40
    # a probe trained on a local copy cannot be checked against a partial download
    r = run.invoke(cli, ["probe", str(base), "--data", str(data), "-o", str(tmp_path / "q.safetensors")])
    assert r.exit_code == 0, r.output
    r = run.invoke(cli, ["compute", "me/sharded", "--probe", str(tmp_path / "q.safetensors"), "-o", str(tmp_path / "z.safetensors")])
    assert r.exit_code != 0 and "--any-probe" in r.output and not (tmp_path / "z.safetensors").exists()
    r = run.invoke(cli, ["compute", "me/sharded", "--probe", str(tmp_path / "q.safetensors"), "-o", str(tmp_path / "z.safetensors"),
                         "--any-probe"])
    assert r.exit_code == 0, r.output


def test_card_names_the_format_rank_exceptions_and_scale_edits():
    import numpy as np

    from patchkit.core.patchfile import Patch, make_edit

    old = (np.arange(24, dtype="<u2").reshape(4, 6) + 0x3F80).astype("<u2").view(np.uint8)
    low = make_edit("model.layers.0.mlp.down_proj.weight", (4, 6), "BF16", np.arange(4), old,
                    u=np.ones((4, 2), np.float32), v=np.full((2, 6), 0.125, np.float32),
                    exceptions=(np.array([3], np.int64), np.array([0x3F80], "<u2")))
    sc = make_edit("model.layers.0.mlp.up_proj.weight", (4, 6), "BF16", np.arange(4), old, gamma=np.array([0.5], np.float32))
    text = render_card(Patch(edits={low.name: low, sc.name: sc}, provenance={"method": "test"}))
    assert "| lowrank r2 +1 exceptions | BF16 |" in text and "| scale | BF16 |" in text
    assert "file format: `patchkit.patch v1.2`" in text  # the two edits share their rows array
    assert "cannot be reverted from a checkpoint patched elsewhere" in text

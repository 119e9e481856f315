"""`headsurgeon push` against a test double of the Hub's HTTP API on 127.0.0.1 (tests/hub_server.py).

Every push runs the real CLI in a subprocess whose environment points huggingface_hub at the test
server (``HF_ENDPOINT`` is read when huggingface_hub is imported). The pushes are independent
(one repo each), so they run concurrently to keep the suite fast; each test then checks one.
The cases that fail before any token or network use run in-process with click's runner.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import headsurgeon as hs
from headsurgeon.card import REPO_PLACEHOLDER, card_writer, for_repo, read_front_matter
from headsurgeon.cli import main
from hub_server import FakeHub

TOKEN, READ_TOKEN, BAD_TOKEN = "hf_test_write", "hf_test_read", "hf_test_bogus_0123456789"
SECRETS = (TOKEN, READ_TOKEN, BAD_TOKEN)
CLI = "from headsurgeon.cli import main; main()"
LABELS = ["cat", "dog", "bird"]
SUMMARY = {"heads": [{"index": 0, "val_top1": 50.0, "test_top1": 48.0}, {"index": 1, "val_top1": 60.0, "test_top1": 55.5}],
           "ensemble": {"val_top1": 61.0, "test_top1": 57.0}, "best_head": 1, "best_epoch": 3, "epochs": 4,
           "epochs_done": 4, "finished": True, "num_classes": 3}
RECIPE = {"model": "test_resnet", "split": {"at": ["layer4"], "heads": 2},
          "data": {"dataset": "torch/cifar10", "img_size": 32, "label_noise": 0.2, "batch_size": 8},
          "loss": {"beta": 0.5, "temperature": 2.0}, "epochs": 4, "seed": 0}


@pytest.fixture(scope="module")
def collapsed(tmp_path_factory):
    """A collapsed head with its card, as `headsurgeon collapse` writes it for a training run."""
    tree = hs.split("test_resnet", at=["layer4"], heads=2, num_classes=3, input_size=[3, 32, 32], seed=1)
    model = hs.collapse(tree, 1).eval()
    out = tmp_path_factory.mktemp("collapsed") / "model"
    hs.export(model, out, label_names=LABELS,
              card=card_writer(tree.spec, 1, summary=SUMMARY, recipe=RECIPE, label_names=LABELS))
    return out, model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(endpoint: str, home: Path, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HOME=str(home), NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    if token is not None:
        env["HF_TOKEN"] = token
    return env


@pytest.fixture(scope="module")
def hub(collapsed, tmp_path_factory):
    """The test Hub, and every push of this module already run against it (concurrently)."""
    folder, _ = collapsed
    tmp = tmp_path_factory.mktemp("hub")
    unverified = tmp / "unverified"
    unverified.mkdir()
    for name in ("config.json", "model.safetensors"):
        (unverified / name).write_bytes((folder / name).read_bytes())
    bad_card = tmp / "bad-card"  # still a verified collapse output (the proof block is intact), bad metadata
    bad_card.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bad_card / name).write_bytes((folder / name).read_bytes())
    (bad_card / "README.md").write_text((folder / "README.md").read_text().replace("model-index:", "model-index: 3\nx:", 1))
    cases = {
        "push": (["--repo", "user/cl-model", "--commit-message", "first push"], TOKEN, None),
        "private_branch": (["--repo", "user/cl-dev", "--revision", "dev", "--private"], TOKEN, None),
        "pr": (["--repo", "user/cl-pr", "--create-pr"], TOKEN, None),
        "dry_run": (["--repo", "user/cl-dry", "--dry-run"], TOKEN, None),
        "no_token": (["--repo", "user/cl-none"], None, None),
        "unauthorized": (["--repo", "user/cl-401"], BAD_TOKEN, None),
        "forbidden": (["--repo", "user/readonly"], READ_TOKEN, None),
        "refused": (["--repo", "user/cl-refused"], TOKEN, f"http://127.0.0.1:{_free_port()}"),
        "forced": (["--repo", "user/cl-forced", "--force"], TOKEN, unverified),
        "validate": (["--repo", "user/cl-valid", "--validate"], TOKEN, None),
        "validate_dry": (["--repo", "user/cl-dryval", "--validate", "--dry-run"], TOKEN, None),
        "validate_rejected": (["--repo", "user/cl-rejected", "--validate"], TOKEN, bad_card),
        "validate_offline": (["--repo", "user/cl-offline", "--validate", "--dry-run"], TOKEN, "offline"),
    }
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.save(x, tmp / "x.pt")
    with FakeHub() as server:
        server.add_repo("user/readonly", {"README.md": b"existing\n"})
        procs = {}
        for name, (args, token, special) in cases.items():
            source = special if isinstance(special, Path) else folder
            endpoint = special if isinstance(special, str) and special != "offline" else server.url
            env = _env(endpoint, tmp / f"home-{name}", token)
            if special == "offline":
                env["HF_HUB_OFFLINE"] = "1"
            procs[name] = subprocess.Popen([sys.executable, "-c", CLI, "push", str(source), *args], env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        results = {"push": _finish(procs.pop("push"))}
        # load the pushed model back in a fresh process (HF_ENDPOINT is read at import), meanwhile the rest runs
        procs["load"] = subprocess.Popen([sys.executable, "-c", LOAD, str(tmp / "x.pt"), str(tmp / "y.pt")],
                                         env=_env(server.url, tmp / "home-load", None),
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        results.update({name: _finish(p) for name, p in procs.items()})
        server.results, server.tmp, server.x = results, tmp, x
        if os.environ.get("HEADSURGEON_SHOW_PUSHES"):
            for name, (rc, out, err) in results.items():
                print(f"== {name} rc={rc}\n{out[-600:]}{err[-600:]}")
        yield server


LOAD = """import sys, timm, torch
m = timm.create_model('hf-hub:user/cl-model', pretrained=True).eval()
assert m.pretrained_cfg['label_names'] == ['cat', 'dog', 'bird'], m.pretrained_cfg
with torch.no_grad():
    torch.save(m(torch.load(sys.argv[1])), sys.argv[2])
"""


def _finish(p: subprocess.Popen) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


def _no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def test_push_arrives_byte_identical(collapsed, hub):
    folder, _ = collapsed
    rc, out, err = hub.results["push"]
    assert rc == 0, err
    _no_secret(out, err)
    assert 'timm.create_model("hf-hub:user/cl-model", pretrained=True)' in out
    got = hub.files("user/cl-model")
    assert sorted(got) == ["README.md", "config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert got[name] == (folder / name).read_bytes()
    local_card = (folder / "README.md").read_text()
    assert REPO_PLACEHOLDER in local_card
    assert got["README.md"] == for_repo(local_card, "user/cl-model").encode()
    assert got["README.md"].decode().replace("user/cl-model", REPO_PLACEHOLDER) == local_card
    assert b'timm.create_model("hf-hub:user/cl-model", pretrained=True)' in got["README.md"]
    # both transfer paths were used: the weights through git-LFS, the small files inline
    repo = hub.repos["user/cl-model"]
    assert repo.modes == {"model.safetensors": "lfs", "config.json": "regular", "README.md": "regular"}
    assert [c["header"]["summary"] for c in repo.commits] == ["first push"]
    assert any(m == "PUT" and p.startswith("/lfs-upload/") for m, p, _ in hub.log)
    assert TOKEN in hub.auth_seen  # HF_TOKEN was what authenticated the push
    assert any(content == got["README.md"].decode() for content in hub.validated_yaml)


def test_push_is_one_commit_whose_card_names_the_repo(collapsed, hub):
    """create_commit with in-memory card: one commit, and the card's model-index (the Hub's evaluation
    results) names the repo it is in."""
    from huggingface_hub import ModelCard

    repo = hub.repos["user/cl-model"]
    assert len(repo.commits) == 1 and sorted(repo.commits[0]["modes"]) == ["README.md", "config.json",
                                                                           "model.safetensors"]
    card = ModelCard(hub.files("user/cl-model")["README.md"].decode())
    results = card.data.eval_results
    assert card.data.model_name == "user/cl-model" and results[0].metric_value == 55.5
    assert results[0].metric_name == "Top-1 accuracy (%)" and results[0].dataset_type == "uoft-cs/cifar10"


def test_validate_asks_the_hub_then_pushes(hub):
    rc, out, err = hub.results["validate"]
    assert rc == 0, err
    assert "card metadata: valid (checked by the Hub at http://127.0.0.1:" in out
    card = hub.files("user/cl-valid")["README.md"].decode()
    assert hub.validated_yaml.count(card) == 2  # by --validate, then by create_commit itself


def test_validate_with_dry_run_sends_only_the_card(hub):
    rc, out, err = hub.results["validate_dry"]
    assert rc == 0, err
    assert "card metadata: valid" in out and "dry run: nothing is uploaded" in out
    assert "user/cl-dryval" not in hub.repos
    assert any('hf-hub:user/cl-dryval"' in c for c in hub.validated_yaml)


def test_validate_refuses_a_card_the_hub_rejects(hub):
    rc, out, err = hub.results["validate_rejected"]
    assert rc == 1 and "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "the Hub rejected the card's metadata" in lines[0] and "model-index" in lines[0], err
    assert "user/cl-rejected" not in hub.repos  # checked before the repo was created


def test_validate_offline_is_skipped_with_a_line(hub):
    rc, out, err = hub.results["validate_offline"]
    assert rc == 0, err
    assert "card metadata not validated: offline (HF_HUB_OFFLINE is set)" in out
    assert not any('hf-hub:user/cl-offline"' in c for c in hub.validated_yaml)


@pytest.mark.parametrize("args, words", [
    (["--revision", "bad name"], "invalid --revision 'bad name': git branch names cannot contain spaces"),
    (["--revision", "a..b"], "invalid --revision 'a..b'"),
    (["--revision", "x.lock"], "invalid --revision 'x.lock'"),
    (["--revision", "refs/heads/dev"], "refs/pr/N"),
    (["--revision", "0123456789abcdef0123456789abcdef01234567"], "commit sha"),
    (["--create-pr", "--revision", "dev"], "--create-pr opens a pull request against main; leave out --revision 'dev'"),
])
def test_dry_run_refuses_what_the_push_refuses(collapsed, monkeypatch, args, words):
    """The same one line from --dry-run and from the real push, and the real push contacts nothing."""
    import huggingface_hub

    folder, _ = collapsed

    class NoHub:
        def __init__(self, *a, **k):
            raise AssertionError("the push contacted the Hub before refusing its input")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoHub)
    outs = []
    for extra in (["--dry-run"], []):
        r = _invoke(["push", str(folder), "--repo", "user/x", *args, *extra])
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
        assert words in r.output, r.output
        outs.append(r.output)
    assert outs[0] == outs[1]


@pytest.mark.parametrize("args, target", [
    (["--revision", "dev"], "branch dev (created from main if missing)"),
    (["--revision", "main", "--create-pr"], "a new pull request against main"),
    (["--revision", "refs/pr/2"], "pull request #2 (refs/pr/2)"),
    (["--revision", "feature/v1.0"], "branch feature/v1.0"),
])
def test_dry_run_accepts_valid_revisions(collapsed, args, target):
    folder, _ = collapsed
    r = _invoke(["push", str(folder), "--repo", "user/x", "--dry-run", *args])
    assert r.exit_code == 0, r.output
    assert target in r.output.splitlines()[0]


def test_pushed_model_loads_back_with_timm(collapsed, hub):
    _, model = collapsed
    rc, out, err = hub.results["load"]
    assert rc == 0, err
    with torch.no_grad():
        want = model(hub.x)
    assert torch.equal(torch.load(hub.tmp / "y.pt"), want)
    assert any(m == "GET" and p == "/user/cl-model/resolve/main/model.safetensors" for m, p, _ in hub.log)


def test_push_to_a_new_private_branch(collapsed, hub):
    folder, _ = collapsed
    rc, out, err = hub.results["private_branch"]
    assert rc == 0, err
    repo = hub.repos["user/cl-dev"]
    assert repo.private
    assert repo.refs["main"] == {} and sorted(repo.refs["dev"]) == ["README.md", "config.json", "model.safetensors"]
    assert repo.refs["dev"]["model.safetensors"] == (folder / "model.safetensors").read_bytes()


def test_push_as_pull_request(collapsed, hub):
    rc, out, err = hub.results["pr"]
    assert rc == 0, err
    repo = hub.repos["user/cl-pr"]
    assert repo.refs["main"] == {} and "model.safetensors" in repo.refs["refs/pr/1"]
    assert "pull request" in out and "/discussions/1" in out


def test_dry_run_uploads_nothing_and_shows_the_card(collapsed, hub):
    folder, _ = collapsed
    rc, out, err = hub.results["dry_run"]
    assert rc == 0, err
    _no_secret(out, err)
    assert "user/cl-dry" not in hub.repos
    assert not [p for _, p, _ in hub.log if "cl-dry" in p]
    for name in ("README.md", "config.json", "model.safetensors"):
        assert name in out
    assert "token: found (not shown)" in out
    card = for_repo((folder / "README.md").read_text(), "user/cl-dry")
    assert card in out  # the whole card, as it would read on the Hub


@pytest.mark.parametrize("case, words", [
    ("no_token", "no Hugging Face token"),
    ("unauthorized", "rejected the token (401"),
    ("forbidden", "(403 Forbidden)"),
    ("refused", "cannot reach the Hub at http://127.0.0.1:"),
])
def test_push_errors_are_one_line(hub, case, words):
    rc, out, err = hub.results[case]
    assert rc != 0
    _no_secret(out, err)
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0], err
    assert hub.files("user/readonly") == {"README.md": b"existing\n"}


def test_refused_connection_names_the_cause(hub):
    # nothing listens there: create_repo, the first call, fails at once (no upload retry backoff)
    assert "ConnectError" in hub.results["refused"][2]


def test_forced_push_of_a_folder_not_from_collapse(collapsed, hub):
    folder, _ = collapsed
    rc, out, err = hub.results["forced"]
    assert rc == 0, err
    assert "warning: pushing an unverified folder" in err
    assert sorted(hub.files("user/cl-forced")) == ["config.json", "model.safetensors"]


def _invoke(args: list[str], **env: str):
    return CliRunner().invoke(main, args, env={"HF_TOKEN": TOKEN, **env})


def test_refuses_a_folder_not_from_collapse(collapsed, tmp_path):
    folder, _ = collapsed
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folder / name).read_bytes())
    r = _invoke(["push", str(bare), "--repo", "user/x"])
    assert r.exit_code != 0 and "not a verified `headsurgeon collapse` output" in r.output and "--force" in r.output
    # a collapsed folder whose weights were changed afterwards is refused too
    edited = tmp_path / "edited"
    edited.mkdir()
    for name in ("README.md", "config.json", "model.safetensors"):
        (edited / name).write_bytes((folder / name).read_bytes())
    with open(edited / "model.safetensors", "ab") as f:
        f.write(b"\0")
    r = _invoke(["push", str(edited), "--repo", "user/x", "--dry-run"])
    assert r.exit_code != 0 and "model.safetensors differs" in r.output
    assert len(r.output.strip().splitlines()) == 1 and TOKEN not in r.output


@pytest.mark.parametrize("repo", ["no-namespace", "user/bad--name", "a/b/c", "user/.hidden"])
def test_invalid_repo_id(collapsed, repo):
    folder, _ = collapsed
    r = _invoke(["push", str(folder), "--repo", repo])
    assert r.exit_code != 0 and f"invalid repo id '{repo}'" in r.output
    assert len(r.output.strip().splitlines()) == 1 and isinstance(r.exception, SystemExit)


def test_card_front_matter_is_the_marker(collapsed):
    folder, _ = collapsed
    meta = read_front_matter((folder / "README.md").read_text())
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert meta["headsurgeon"]["architecture"] == "test_resnet" and set(meta["headsurgeon"]["files"]) == {
        "config.json", "model.safetensors"}

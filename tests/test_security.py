"""What a crafted input must not do (issue 27): a tree whose spec.json names a leaf module runs no code,
`push` uploads nothing a link points to nor anything `collapse` did not write, and `recipe -o` replaces
no FIFO or device."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import headsurgeon as hs
from headsurgeon.card import card_writer
from headsurgeon.cli import main
from headsurgeon.errors import HeadsurgeonError
from headsurgeon.spec import SPEC_FILE, SplitSpec
from headsurgeon.tree import WEIGHTS_FILE, HeadTree

ROOT = Path(__file__).resolve().parents[1]
EVIL = """from pathlib import Path
Path(__file__).with_name("MARKER").write_text("imported")
import torch
class Foo(torch.nn.Module):
    pass
"""


def _fake_tree(folder: Path, **spec) -> Path:
    """A tree folder as a stranger could hand it over: the spec is what matters, the weights never load."""
    folder.mkdir()
    (folder / SPEC_FILE).write_text(SplitSpec(**{"architecture": "test_resnet", **spec}).to_json())
    (folder / WEIGHTS_FILE).write_bytes(b"not weights")
    return folder


def _cli(cwd: Path, *calls: list[str]) -> list[subprocess.CompletedProcess]:
    """``python -m headsurgeon ARGS`` in ``cwd`` for each list of ARGS, run at once (each start imports torch
    and timm): -m puts the current folder on sys.path first."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "headsurgeon", *args], cwd=cwd, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args in calls]
    return [subprocess.CompletedProcess(p.args, p.returncode, *p.communicate(timeout=300)) for p in procs]


def _one_error_line(res: subprocess.CompletedProcess, *words: str) -> str:
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------- 1. leaf modules

def test_collapse_of_a_crafted_tree_runs_no_code_from_the_current_folder(tmp_path):
    """spec.json names evil:Foo and evil.py sits in the current folder: `python -m headsurgeon collapse`
    refuses in one line before importing anything, and even told to import it (--trust-leaf-modules, or
    --leaf-module evil:Foo) it cannot import the file there: -m's current folder is not on the path."""
    _fake_tree(tmp_path / "tree", leaf_modules=("evil:Foo",))
    (tmp_path / "evil.py").write_text(EVIL)
    # -o outside pytest's folders (never created: the load is refused first), so that no check of where
    # an export may go (pytest's own .lock in its base folder) answers before the spec is read
    out = Path(tempfile.gettempdir()) / f"hs-security-{os.getpid()}-{tmp_path.name}" / "out"
    collapse = ["collapse", "tree", "-o", str(out)]
    refused, trusted = _cli(tmp_path, collapse, [*collapse, "--trust-leaf-modules"])  # trusted = named, here
    _one_error_line(refused, "'evil:Foo'", "--leaf-module evil:Foo", "--trust-leaf-modules")
    _one_error_line(trusted, "cannot import leaf module class 'evil:Foo'", "No module named 'evil'")
    assert not (tmp_path / "MARKER").exists() and not out.parent.exists()


def test_load_refuses_leaf_modules_nobody_named(tmp_path, monkeypatch):
    """The Python API: a module on the path is imported only when named or trusted; one imported already
    (timm's own classes, here every timm model module) needs neither."""
    from headsurgeon.trace import allow_leaf_modules, spec_classes

    name = "hs_security_evil_leaf"
    (tmp_path / f"{name}.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(tmp_path))  # as if it were the current folder of a script
    monkeypatch.delitem(sys.modules, name, raising=False)
    tree = _fake_tree(tmp_path / "tree", leaf_modules=(f"{name}:Foo",))
    with pytest.raises(HeadsurgeonError, match=f"names leaf module '{name}:Foo', which is not imported yet") as e:
        HeadTree.load(tree)
    assert len(str(e.value).splitlines()) == 1 and "trust_leaf_modules=True" in str(e.value)
    assert not (tmp_path / "MARKER").exists() and name not in sys.modules
    encoder = "timm.models.gemma4_vit:Gemma4VitEncoder"
    assert spec_classes([encoder], "spec")[0].__name__ == "Gemma4VitEncoder"
    with pytest.raises(HeadsurgeonError, match="not module:Class"):
        spec_classes([".evil:Foo"], "spec", trust=True)  # no relative imports
    with allow_leaf_modules([f"{name}:Foo"]):  # named (what collapse --leaf-module does): imported
        assert spec_classes([f"{name}:Foo"], "spec")[0].__name__ == "Foo"
    assert (tmp_path / "MARKER").exists()
    (tmp_path / "MARKER").unlink()
    monkeypatch.delitem(sys.modules, name)
    with pytest.raises(HeadsurgeonError, match="is unreadable"):  # trusted: imported, then the fake weights fail
        HeadTree.load(tree, trust_leaf_modules=True)
    assert (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("spec, words", [
    ({"architecture": "hf-hub:someone/model"}, "architecture 'hf-hub:someone/model'"),
    ({"model_args": {"checkpoint_path": "/etc/hostname"}}, "model_args ['checkpoint_path']"),
])
def test_a_spec_names_no_source_for_timm_to_read(tmp_path, spec, words):
    """A spec names a registered architecture and its kwargs: never a Hub repo, folder or checkpoint."""
    with pytest.raises(HeadsurgeonError, match="never writes") as e:
        HeadTree.load(_fake_tree(tmp_path / "tree", **spec))
    assert words in str(e.value) and len(str(e.value).splitlines()) == 1


# ---------------------------------------------------------------------------------------- 2. push

@pytest.fixture(scope="module")
def collapsed(tmp_path_factory) -> Path:
    tree = hs.split("test_resnet", at=["layer4"], heads=2, num_classes=3, input_size=[3, 32, 32], seed=1)
    out = tmp_path_factory.mktemp("collapsed") / "model"
    hs.export(hs.collapse(tree, 1), out, card=card_writer(tree.spec, 1))
    return out


@pytest.fixture
def folder(collapsed, tmp_path) -> Path:
    """A fresh copy of a verified collapse output."""
    d = tmp_path / "model"
    d.mkdir()
    for f in collapsed.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


@pytest.fixture
def no_hub(monkeypatch):
    import huggingface_hub

    class NoHub:
        def __init__(self, *a, **k):
            raise AssertionError("push contacted the Hub before refusing the folder")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoHub)


SECRET = "hf_security_test_secret_token"


def _push(folder: Path, *args: str):
    return CliRunner().invoke(main, ["push", str(folder), "--repo", "user/x", *args], env={"HF_TOKEN": "hf_test_write"})


def _refused(r, *words: str) -> None:
    out = r.output.strip()
    assert r.exit_code == 1 and len(out.splitlines()) == 1 and out.startswith("Error: "), r.output
    assert "Traceback" not in out and SECRET not in out
    for w in words:
        assert w in out, out


@pytest.mark.parametrize("how", ["extra link", "weights link", "folder link"])
def test_push_refuses_symlinks_even_forced(folder, tmp_path, no_hub, how):
    """A link to the token file would publish the token while the folder reads as verified; a link to
    the real weights (same sha256) would verify too. Refused in --dry-run, the push, and with --force."""
    token = tmp_path / "token"
    token.write_text(SECRET)
    if how == "extra link":
        link = folder / "notes.txt"
        link.symlink_to(token)
    elif how == "weights link":
        real = tmp_path / "weights.safetensors"
        os.replace(folder / "model.safetensors", real)
        link = folder / "model.safetensors"
        link.symlink_to(real)
    else:
        (tmp_path / "outside").mkdir()
        (tmp_path / "outside" / "token").write_text(SECRET)
        link = folder / "extra"
        link.symlink_to(tmp_path / "outside", target_is_directory=True)
    for args in (["--dry-run"], [], ["--force"], ["--force", "--dry-run"]):
        _refused(_push(folder, *args), f"'{link}' is a symbolic link")


def test_push_refuses_files_collapse_did_not_write(folder, no_hub):
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.txt").write_text("mine")
    for args in (["--dry-run"], []):
        _refused(_push(folder, *args), "not a verified `headsurgeon collapse` output",
                 "it holds sub/notes.txt, which `headsurgeon collapse` does not write", "--force")
    r = _push(folder, "--force", "--dry-run")  # forced: a regular file is the user's to push, and is listed
    assert r.exit_code == 0 and "sub/notes.txt" in r.output and "NOT verified" in r.output, r.output
    os.mkfifo(folder / "pipe")
    _refused(_push(folder, "--force", "--dry-run"), f"'{folder / 'pipe'}' is not a regular file")


def test_push_checks_the_folder_again_before_the_upload(folder, tmp_path):
    from headsurgeon.hub import operations, plan

    p = plan(folder, "user/x")
    assert p.verified and p.files == ["README.md", "config.json", "model.safetensors"]
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(HeadsurgeonError, match="is a symbolic link"):
        operations(p)


# ---------------------------------------------------------------------------------------- 3. recipe -o

@pytest.mark.parametrize("args", [[], ["--schema"]])
def test_recipe_o_refuses_a_fifo(tmp_path, args):
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    r = CliRunner().invoke(main, ["recipe", *args, "-o", str(fifo)])
    out = r.output.strip()
    assert r.exit_code == 1 and len(out.splitlines()) == 1 and "is a FIFO (named pipe), not a regular file" in out, out
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_write_text_refuses_non_regular_targets_and_replaces_links(tmp_path):
    """Every one-file writer goes through write_text: a folder is refused; a symbolic link is replaced by
    the file (the policy write_text always had), so what it points to, a FIFO or a file, is left alone;
    and a link planted at its temporary name is not written through."""
    from headsurgeon.storage import write_text

    (tmp_path / "dir").mkdir()
    with pytest.raises(HeadsurgeonError, match="is a directory, not a regular file"):
        write_text(tmp_path / "dir", "x")
    fifo, victim = tmp_path / "fifo", tmp_path / "victim"
    os.mkfifo(fifo)
    victim.write_text("keep")
    for target in (fifo, victim):
        link = tmp_path / f"link-to-{target.name}"
        link.symlink_to(target)
        r = CliRunner().invoke(main, ["recipe", "-o", str(link)])
        assert r.exit_code == 0, r.output
        assert not link.is_symlink() and "model:" in link.read_text()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and victim.read_text() == "keep"
    (tmp_path / ".r.yaml.tmp").symlink_to(victim)
    write_text(tmp_path / "r.yaml", "new")
    assert (tmp_path / "r.yaml").read_text() == "new" and victim.read_text() == "keep"
    assert not (tmp_path / ".r.yaml.tmp").exists()

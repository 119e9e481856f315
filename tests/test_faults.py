"""Issue 14: the export carries its data config, and faults (kills, corrupt files, full disks,
read-only folders, bad input) give one line, lose nothing and mislabel nothing."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from headsurgeon import HeadsurgeonError
from headsurgeon import train as T
from headsurgeon.cli import main
from headsurgeon.pipeline import collapse_dir
from headsurgeon.rundir import RunDir

from test_train import TINY, _recipe, folder  # noqa: F401  (the tiny image-folder fixture)

ROOT = Path(__file__).resolve().parents[1]


def _quiet(m):
    return None


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):  # noqa: F811
    """A finished 3-epoch run of the tiny tree (shared, read-only: tests copy it before breaking it)."""
    out = tmp_path_factory.mktemp("run") / "run"
    T.train(_recipe(folder, "epochs=3"), output=str(out), log=_quiet)
    return out


def _copy(run, tmp_path):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def _one_line(code, out, match, usage=False):
    """``Error: <one line>``, exit 1 (2: a click usage error, when ``usage``), no traceback."""
    assert code == 1 or (usage and code == 2), out
    lines = [x for x in out.strip().splitlines() if x.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in out, out
    assert match in lines[0], out


# ------------------------------------------------------------------ 1. the export carries its data config

def test_timm_alone_reproduces_the_runs_test_accuracy(run, folder, tmp_path):  # noqa: F811
    """timm's own resolve_data_config + create_transform (no headsurgeon loader) on the run's test
    split give the run's reported test top-1 of the exported head."""
    import timm
    from timm.data import create_transform, resolve_data_config

    out, head = collapse_dir(run, None, tmp_path / "model", log=_quiet)
    cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert cfg["input_size"] == [3, 16, 16] and cfg["crop_pct"] == 1.0 and cfg["crop_mode"] == "center"
    assert cfg.get("test_input_size") in (None, [3, 16, 16]) and "test_crop_pct" not in cfg
    summary = json.loads((run / "summary.json").read_text())
    want = summary["heads"][head]["test_top1"]
    m = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert m.pretrained_cfg["label_names"] == ["class0", "class1", "class2"] and m.num_classes == 3
    for use_test_size in (False, True):  # validate.py uses the test size when there is one
        dc = resolve_data_config(model=m, use_test_size=use_test_size)
        tf = create_transform(**dc)
        correct = n = 0
        with torch.no_grad():
            for label, cls in enumerate(sorted(p.name for p in (folder / "validation").iterdir())):
                for f in sorted((folder / "validation" / cls).iterdir()):
                    x = tf(Image.open(f).convert("RGB")).unsqueeze(0)
                    correct += int(m(x).argmax(1).item() == label)
                    n += 1
        assert abs(100.0 * correct / n - want) <= 100.0 / n + 1e-6, (correct, n, want, dc)


def test_a_tree_without_a_run_keeps_its_models_own_config(tmp_path):
    code, out = _cli("split", "resnet10t", "--at", "layer4", "--heads", "2", "--num-classes", "3",
                     "--model-kwargs", "channels=[8,16,32,64] stem_width=8", "--input-size", "3,32,32",
                     "-o", tmp_path / "t")
    assert code == 0, out
    code, out = _cli("collapse", tmp_path / "t", "-o", tmp_path / "m")
    assert code == 0, out
    import timm

    cfg = json.loads((tmp_path / "m" / "config.json").read_text())["pretrained_cfg"]
    own = timm.create_model("resnet10t").pretrained_cfg
    assert cfg["crop_pct"] == own["crop_pct"] and cfg["input_size"] == list(own["input_size"])
    assert cfg["test_input_size"] == list(own["test_input_size"])


# ------------------------------------------------------------------ 2. checkpoint sets stay consistent under kill -9

_KILL_AFTER_BEST = textwrap.dedent("""
    # kill -9 this process right after epoch {epoch}'s best/ is written, before last/ and summary.json
    import os, signal, sys
    from headsurgeon import recipe as R, train as T
    from headsurgeon.rundir import RunDir
    save_last = RunDir.save_last
    def killing(self, tree, state, *a, **k):
        if state["epoch"] == {epoch} and "step" not in state:
            os.kill(os.getpid(), signal.SIGKILL)
        return save_last(self, tree, state, *a, **k)
    RunDir.save_last = killing
    flat, _ = R.load(None, sys.argv[2:])
    T.train(flat, output=sys.argv[1], log=lambda m: None)
""")


def _killed_run(folder, out, epoch, *sets):  # noqa: F811
    sets = [*TINY, "data.dataset=folder", f"data.root={folder}", "epochs=3", *sets]
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_BEST.format(epoch=epoch), str(out), *sets],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return sets


def test_kill_between_best_and_summary_collapses_with_the_records_accuracies(folder, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    sets = _killed_run(folder, out, 2)
    summary = json.loads((out / "summary.json").read_text())
    record = json.loads((out / "best" / "record.json").read_text())
    assert summary["best_epoch"] == 1 and record["best_epoch"] == 2  # the fault: best/ one epoch ahead
    assert summary["heads"] != record["heads"]  # so a card labelled from summary.json would differ
    assert (out / ".lock").exists()  # left by the killed process
    notes = []
    model, head = collapse_dir(out, None, tmp_path / "m", log=notes.append)
    assert head == record["best_head"]
    assert any("best/ holds the weights of epoch 2" in n for n in notes), notes
    card = (model / "README.md").read_text()
    h = record["heads"][head]
    row = next(line for line in card.splitlines() if line.startswith("|") and "(this model)" in line)
    assert f"{h['val_top1']:.2f}" in row and f"{h['test_top1']:.2f}" in row, row
    # the killed run resumes (stale lock taken over) and ends with summary and record in agreement
    code, text = _cli("train", *[a for kv in sets for a in ("--set", kv)], "-o", out, "--resume")
    assert code == 0, text
    s, r = RunDir(out).summary(), RunDir(out).best_record()
    assert s["finished"] and all(s[k] == r[k] for k in ("best_epoch", "best_head", "heads"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_old_runs_without_a_record_are_labelled_by_their_summary(run, tmp_path):
    old = _copy(run, tmp_path)
    (old / "best" / "record.json").unlink()
    notes = []
    _, head = collapse_dir(old, None, tmp_path / "m", log=notes.append)
    assert head == json.loads((old / "summary.json").read_text())["best_head"] and not any("note" in n for n in notes)


# ------------------------------------------------------------------ 3. corrupt files: one line each

def _sets(folder, *extra):  # noqa: F811
    return [a for kv in [*TINY, "data.dataset=folder", f"data.root={folder}", "epochs=3", *extra]
            for a in ("--set", kv)]


@pytest.mark.parametrize("damage, match", [
    (lambda b: b[: len(b) // 2], "unreadable"),
    (lambda b: b"", "unreadable"),
    (lambda b: os.urandom(len(b)), "unreadable"),
    ("incomplete", "incomplete (no optimizer"),
])
def test_a_damaged_state_file_is_refused_in_one_line(run, folder, tmp_path, damage, match):  # noqa: F811
    d = _copy(run, tmp_path)
    state = d / "last" / "state.pt"
    if damage == "incomplete":
        s = torch.load(state, weights_only=True)
        del s["optimizer"]
        torch.save(s, state)
    else:
        state.write_bytes(damage(state.read_bytes()))
    before = sorted(p.name for p in d.iterdir())
    _one_line(*_cli("train", *_sets(folder, "epochs=4"), "-o", d, "--resume"), match)
    assert sorted(p.name for p in d.iterdir()) == before  # nothing written, no lock left


def test_a_truncated_tree_and_the_weights_of_another_tree_are_told_apart(tmp_path):
    import shutil

    def tree(name, *args):
        code, out = _cli("split", *TINY_SPLIT, "--at", "layer4", *args, "-o", tmp_path / name)
        assert code == 0, out
        return tmp_path / name

    two, four, wide = tree("two", "--heads", "2"), tree("four", "--heads", "4"), tree("wide", "--heads", "2", "--num-classes", "5")
    for other, match in ((four, "unexpected keys, e.g. levels.1.2."), (wide, "mis-shaped tensors, e.g. ")):
        mixed = tmp_path / f"mixed-{other.name}"
        shutil.copytree(two, mixed)
        shutil.copy(other / "tree.safetensors", mixed)
        (mixed / "tree.safetensors.sha256").unlink()  # as trees written before checksums
        code, out = _cli("collapse", mixed, "-o", tmp_path / "m")
        _one_line(code, out, "does not fit the tree its spec.json describes (")
        assert match in out and "come from different trees" in out, out
    cut = tmp_path / "cut"
    shutil.copytree(two, cut)
    w = cut / "tree.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    (cut / "tree.safetensors.sha256").unlink()
    code, out = _cli("collapse", cut, "-o", tmp_path / "m")
    _one_line(code, out, "is unreadable (")
    assert "a truncated or corrupt file" in out and "do not fit" not in out, out
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("edit, match", [
    (lambda s: "{not json", "unreadable"),
    (lambda s: json.dumps(dict(s, best_head=7)), "best_head 7 is not a head index 0..3"),
    (lambda s: json.dumps(dict(s, best_head=-1)), "best_head -1"),
    (lambda s: json.dumps({k: v for k, v in s.items() if k != "heads"}), "no heads"),
    (lambda s: json.dumps(dict(s, heads=s["heads"][:2])), "2 heads listed but the checkpoint has 4"),
    (lambda s: json.dumps([1, 2]), "not a JSON object"),
])
@pytest.mark.parametrize("which", ["summary.json", "best/record.json"])
def test_an_invalid_or_edited_summary_is_refused_by_collapse(run, tmp_path, edit, match, which):
    d = _copy(run, tmp_path)
    f = d / which
    f.write_text(edit(json.loads(f.read_text())))
    _one_line(*_cli("collapse", d, "-o", tmp_path / "m"), match)
    assert not (tmp_path / "m").exists()


def test_non_json_metrics_lines_are_refused_or_rewritten_and_reported(run, folder, tmp_path):  # noqa: F811
    d = _copy(run, tmp_path)
    m = d / "metrics.jsonl"
    lines = m.read_text().splitlines()
    m.write_text("\n".join([lines[0], "garbage{", lines[2][:40]]) + "\n")  # an edit and a half-written line
    with pytest.raises(HeadsurgeonError, match="line 2 is not a JSON object"):
        RunDir(d).metrics()
    code, out = _cli("train", *_sets(folder, "epochs=4"), "-o", d, "--resume")
    assert code == 0, out
    assert "line(s) 2, 3 did not match the checkpoint" in out and "rewritten from last/state.pt" in out
    rows = RunDir(d).metrics()
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and json.loads(lines[1]) == rows[1]


@pytest.mark.parametrize("where", ["best", "last"])
def test_a_flipped_block_in_the_weights_is_caught_by_the_checksum(run, folder, tmp_path, where):  # noqa: F811
    d = _copy(run, tmp_path)
    w = d / where / "tree.safetensors"
    b = bytearray(w.read_bytes())
    b[len(b) - 4096: len(b) - 4096 + 512] = bytes(512)  # one zeroed 512-byte block inside the tensor data
    w.write_bytes(bytes(b))
    if where == "best":
        _one_line(*_cli("collapse", d, "-o", tmp_path / "m"), "does not match its checksum")
    else:
        _one_line(*_cli("train", *_sets(folder, "epochs=4"), "-o", d, "--resume"), "does not match its checksum")


# ------------------------------------------------------------------ 5. bad input: one line, never silent

TINY_SPLIT = ["resnet10t", "--model-kwargs", "channels=[8,16,32,64] stem_width=8", "--num-classes", "3"]


@pytest.mark.parametrize("args, match", [
    (["split", *TINY_SPLIT, "--at", "layer4", "--heads", "2", "--input-size", "3,0,0"], "three positive integers C,H,W"),
    (["split", *TINY_SPLIT, "--at", "layer4", "--heads", "2", "--input-size", "3,x"], "e.g. 3,224,224"),
    (["nodes", "resnet10t", "--input-size", "3,-1,5"], "three positive integers C,H,W, e.g. 3,224,224"),
    (["nodes", "resnet10t", "--input-size", "3,32"], "three positive integers"),
    (["split", "resnet10t", "--at", "layer4", "--heads", "2", "--num-classes", "0"], "--num-classes must be at least 1"),
    (["split", "resnet10t", "--at", "layer4", "--heads", "2", "--num-classes", "-5"], "--num-classes must be at least 1"),
    (["nodes", "resnet10t", "--num-classes", "-5"], "--num-classes must be at least 1"),
    (["split", *TINY_SPLIT, "--at", "layer3,layer3", "--heads", "4"], "'layer3' is given twice; list each once"),
    (["nodes", "test_vit", "--input-size", "3,8,8"], "test_vit cannot run on input size 3x8x8 (AssertionError: "),
    (["split", *TINY_SPLIT, "--at", "layer4", "--heads", "2", "--input-size", "1,16,16"],
     "resnet10t cannot run on input size 1x16x16 (RuntimeError: "),
    (["demo", "--epochs", "0"], "--epochs must be at least 1"),
    (["demo", "--epochs", "-2"], "--epochs must be at least 1"),
])
def test_bad_command_line_values_give_one_line(tmp_path, args, match):
    _one_line(*_cli(*args, *(["-o", tmp_path / "out"] if args[0] in ("split", "demo") else [])), match)
    assert not (tmp_path / "out").exists()


def test_train_into_a_tree_directory_or_a_zero_stop_after_gives_one_line(tmp_path):
    t = tmp_path / "t"
    code, out = _cli("split", *TINY_SPLIT, "--at", "layer4", "--heads", "2", "-o", t)
    assert code == 0, out
    before = sorted(p.name for p in t.iterdir())
    for resume in ([], ["--resume"]):
        _one_line(*_cli("train", "-o", t, *resume), "is a head tree directory, not a run; to train that tree give it "
                  f"as the recipe's tree (--set tree={t})")
    assert sorted(p.name for p in t.iterdir()) == before
    _one_line(*_cli("train", "--stop-after", "0", "-o", tmp_path / "r"), "--stop-after (stop_after) must be at least 1")
    assert not (tmp_path / "r").exists()


def test_duplicate_split_point_suggests_a_valid_list(tmp_path):
    code, out = _cli("split", *TINY_SPLIT, "--at", "layer3,layer3", "--heads", "4", "-o", tmp_path / "o")
    assert "e.g. --at layer3\n" in out + "\n" and "layer3,layer3" not in out.split("e.g.")[-1]
    code, out = _cli("split", *TINY_SPLIT, "--at", "layer4,layer3", "--heads", "4", "-o", tmp_path / "o")
    assert out.strip().endswith("e.g. --at layer3,layer4"), out


def test_the_api_refuses_what_the_cli_refuses():
    from headsurgeon import split

    with pytest.raises(HeadsurgeonError, match="num_classes must be a positive integer"):
        split("resnet10t", at="layer4", heads=2, num_classes=0)
    with pytest.raises(HeadsurgeonError, match="input_size must be three positive integers"):
        split("resnet10t", at="layer4", heads=2, num_classes=3, input_size=(3, 0, 0))


@pytest.mark.parametrize("sets, match", [
    (["data.num_classes=2"], "data.num_classes is 2 but 'folder' has 3 classes"),
    (["data.train_split=validation"], "would train on the test images"),
    (["data.dataset=cifar10"], "unknown data.dataset 'cifar10'"),
    (["data.batch_size=1000"], "fewer than one batch of 1000"),  # refused after the tree is built: no lock left
    (["optim.opt=adamw", "optim.opt_betas=[0.9]"], "optimizer 'adamw' cannot be created: tuple index out of range"),
])
def test_bad_recipe_values_give_one_line_and_leave_no_run_dir(folder, tmp_path, sets, match):  # noqa: F811
    _one_line(*_cli("train", *_sets(folder, *sets), "-o", tmp_path / "r"), match)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("split_", ["validation", "test2", "val"])
def test_digits_never_trains_on_its_test_split(tmp_path, split_):
    _one_line(*_cli("train", "--set", f"data.train_split={split_}", "-o", tmp_path / "r"),
              "would train on the test images of 'digits'")
    assert not (tmp_path / "r").exists()


def test_stray_files_in_an_image_folder_are_refused(folder, tmp_path):  # noqa: F811
    import shutil

    root = tmp_path / "data"
    shutil.copytree(folder, root)
    img = next((root / "train" / "class0").iterdir())
    shutil.copy(img, root / "train" / "curves.png")  # e.g. a run written into the data folder
    _one_line(*_cli("train", *_sets(root), "-o", tmp_path / "r"), "outside a class sub-folder (e.g. 'curves.png')")
    (root / "train" / "curves.png").unlink()
    (root / "train" / "class0" / "run").mkdir()
    shutil.copy(img, root / "train" / "class0" / "run" / "curves.png")
    _one_line(*_cli("train", *_sets(root), "-o", tmp_path / "r"), "class0/run/curves.png")
    shutil.rmtree(root / "train" / "class0" / "run")
    shutil.rmtree(root / "validation" / "class1")  # test indices would shift: class2 would be read as 1
    _one_line(*_cli("train", *_sets(root), "-o", tmp_path / "r"), "list different classes")
    assert not (tmp_path / "r").exists()


def test_split_says_the_size_before_writing_and_refuses_what_does_not_fit(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    code, out = _cli("split", *TINY_SPLIT, "--at", "input", "--heads", "8", "-o", tmp_path / "t")
    assert code == 0, out
    lines = out.splitlines()
    size = next(i for i, x in enumerate(lines) if x.startswith(f"writing {tmp_path / 't'}: "))
    assert "of weights (8 heads)" in lines[size] and size < next(i for i, x in enumerate(lines) if x.startswith("wrote"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    _one_line(*_cli("split", *TINY_SPLIT, "--at", "input", "--heads", "8", "-o", tmp_path / "u"),
              "but only 1.0 kB is free there")
    assert not (tmp_path / "u").exists()


# ------------------------------------------------------------------ 4. file-system faults: one line, before the work

def _read_only_dir(tmp_path):
    """A folder nobody here can create files in: mode 555, or (as root, who ignores modes) sysfs."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    if os.geteuid() == 0:
        d = Path("/sys/kernel")
    try:
        (d / "probe").write_text("x")
    except OSError:
        return d
    (d / "probe").unlink()
    pytest.skip(f"cannot make a read-only folder here ({d} is writable)")


def _outputs(run, folder, tmp_path, target):  # noqa: F811
    """The same -o for train, split and collapse."""
    return {"train": ["train", *_sets(folder), "-o", target],
            "split": ["split", *TINY_SPLIT, "--at", "layer4", "--heads", "2", "-o", target],
            "collapse": ["collapse", run, "-o", target]}


@pytest.mark.parametrize("command", ["train", "split", "collapse"])
def test_unwritable_outputs_are_refused_before_the_work(run, folder, tmp_path, command):  # noqa: F811
    afile = tmp_path / "some_file"
    afile.write_text("x")
    ro = _read_only_dir(tmp_path)
    for target, match in ((afile / "sub", "is a file, not a directory"), (afile, "is a file"),
                          (ro / "sub", "cannot write to")):
        code, out = _cli(*_outputs(run, folder, tmp_path, target)[command])
        _one_line(code, out, match, usage=target == afile)  # click's own check of -o names that one
        assert "epoch 1/" not in out and "verified" not in out  # refused before training, splitting or collapsing


def _no_space(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(folder, tmp_path, monkeypatch):  # noqa: F811
    import safetensors.torch

    d = tmp_path / "run"
    code, out = _cli("train", *_sets(folder), "-o", d, "--stop-after", "1")
    assert code == 0, out
    before = {p: p.read_bytes() for p in (d / "last").iterdir()}
    monkeypatch.setattr(safetensors.torch, "save_model", _no_space)  # every checkpoint of epoch 2 fails
    code, out = _cli("train", *_sets(folder), "-o", d, "--resume")
    _one_line(code, out, "no space left on the device")
    assert f"previous checkpoint is intact: free space, then continue with `headsurgeon train --resume -o {d}`" in out
    assert {p: p.read_bytes() for p in (d / "last").iterdir()} == before
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temp dir, no lock
    assert RunDir(d).summary()["epochs_done"] == 1
    monkeypatch.undo()
    code, out = _cli("train", *_sets(folder), "-o", d, "--resume")  # after freeing space
    assert code == 0, out
    assert [r["epoch"] for r in RunDir(d).metrics()] == [1, 2, 3] and RunDir(d).summary()["finished"]


def test_disk_full_while_writing_summary_csv_is_one_line_and_resumable(folder, tmp_path, monkeypatch):  # noqa: F811
    import timm.utils

    from headsurgeon.tracking import read_csv

    d, real, calls = tmp_path / "run", timm.utils.update_summary, []

    def full_at_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            _no_space()
        return real(*a, **k)

    monkeypatch.setattr(timm.utils, "update_summary", full_at_epoch_2)
    code, out = _cli("train", *_sets(folder), "-o", d)
    _one_line(code, out, f"cannot write '{d / 'summary.csv'}': no space left on the device; the previous checkpoint is "
                         f"intact: free space, then continue with `headsurgeon train --resume -o {d}`")
    assert RunDir(d).summary()["epochs_done"] == 1 and not (d / ".lock").exists()
    monkeypatch.undo()
    code, out = _cli("train", *_sets(folder), "-o", d, "--resume")
    assert code == 0, out
    assert [r["epoch"] for r in RunDir(d).metrics()] == [1, 2, 3]
    assert [int(r["epoch"]) for r in read_csv(d / "summary.csv")] == [1, 2, 3]  # rewritten from the checkpoint on


def test_disk_full_while_rewriting_the_recipe_on_resume_keeps_it(run, folder, tmp_path, monkeypatch):  # noqa: F811
    d = _copy(run, tmp_path)
    before = (d / "recipe.yaml").read_bytes()
    real = Path.write_text

    def full(self, *a, **k):
        if "recipe.yaml" in self.name:  # the file itself, or its temporary sibling
            _no_space()
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    _one_line(*_cli("train", *_sets(folder, "epochs=4"), "-o", d, "--resume"),
              f"cannot write '{d / 'recipe.yaml'}': no space left on the device; '{d / 'recipe.yaml'}' was left as it was")
    assert (d / "recipe.yaml").read_bytes() == before and not [p for p in d.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("command", ["split", "collapse"])
def test_disk_full_while_writing_a_tree_or_export_leaves_nothing(run, folder, tmp_path, monkeypatch, command):  # noqa: F811
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_model", _no_space)
    monkeypatch.setattr(safetensors.torch, "save_file", _no_space)
    target = tmp_path / "out"
    _one_line(*_cli(*_outputs(run, folder, tmp_path, target)[command]), "no space left on the device")
    assert not target.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_output_another_process_writes_meanwhile_is_kept(tmp_path):
    from headsurgeon.storage import atomic_dir

    target = tmp_path / "out"
    with pytest.raises(HeadsurgeonError, match="was written by another process while this one worked; it was left"):
        with atomic_dir(target) as tmp:  # e.g. two `split -o out` at once: the one that finishes second
            (tmp / "mine").write_text("mine")
            target.mkdir()
            (target / "theirs").write_text("theirs")
    assert [p.name for p in target.iterdir()] == ["theirs"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_dir(tmp_path / "empty") as tmp:  # an empty folder made meanwhile is still filled
        (tmp_path / "empty").mkdir()
        (tmp / "mine").write_text("mine")
    with atomic_dir(target, overwrite=True) as tmp:  # and --overwrite still replaces
        (tmp / "mine").write_text("mine")
    assert [p.name for p in (tmp_path / "empty").iterdir()] == [p.name for p in target.iterdir()] == ["mine"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_replaces_in_place_and_a_kill_mid_replace_loses_nothing(tmp_path, monkeypatch, exchange):
    """--overwrite swaps the new folder in (renameat2 where the OS has it, else two renames); a kill
    between the two renames leaves the old folder as .NAME.old, which the next write to NAME puts back."""
    from headsurgeon import storage

    swaps, real = [], storage._exchange
    monkeypatch.setattr(storage, "_exchange", lambda a, b: swaps.append(exchange and real(a, b)) or swaps[-1])
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with storage.atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["out"]
    assert swaps == [exchange and sys.platform == "linux"]  # Linux swaps in one step

    def killed(src, dst):  # the first rename (target -> .out.old) happens, then the process dies
        os.rename(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "_exchange", lambda a, b: False)
    monkeypatch.setattr(storage.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        with storage.atomic_dir(target, overwrite=True) as tmp:
            (tmp / "newer").write_text("newer")
    monkeypatch.undo()
    assert not target.exists() and (tmp_path / ".out.old" / "new").is_file()
    storage.remove_stale_temps(target)  # what the next split/collapse/train to `out` does first
    assert [p.name for p in target.iterdir()] == ["new"] and not (tmp_path / ".out.old").exists()


_KILL_IN_FIRST_CHECKPOINT = textwrap.dedent("""
    # kill -9 this process half-way through writing the first last/state.pt
    import os, signal, sys, torch
    from headsurgeon import recipe as R, train as T
    from headsurgeon import rundir
    def dying(obj, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a file")
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    rundir.torch.save = dying
    flat, _ = R.load(None, sys.argv[2:])
    T.train(flat, output=sys.argv[1], log=lambda m: None)
""")


_KILL_IN_SPLIT = textwrap.dedent("""
    # kill -9 this process half-way through writing the tree of `headsurgeon split`
    import os, signal, sys, safetensors.torch
    from headsurgeon.cli import main
    def dying(model, path, *a, **k):
        open(path, "wb").write(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    safetensors.torch.save_model = dying
    main(sys.argv[1:])
""")


def test_a_killed_split_leaves_no_half_written_folder_behind(tmp_path):
    args = ["split", *TINY_SPLIT, "--at", "layer4", "--heads", "2", "-o", str(tmp_path / "t")]
    proc = subprocess.run([sys.executable, "-c", _KILL_IN_SPLIT, *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    half = [p.name for p in tmp_path.iterdir()]
    assert len(half) == 1 and half[0].startswith(".t."), half  # the killed write's temporary folder, not t
    live = tmp_path / f".t.{os.getpid()}.inprogress"  # a write still in progress (its process lives) is kept
    live.mkdir()
    (tmp_path / ".u.999999999.x").mkdir()  # another target's
    code, out = _cli(*args)
    assert code == 0, out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, ".u.999999999.x", "t"])


def test_a_kill_in_the_first_checkpoint_leaves_a_usable_directory(folder, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    sets = [*TINY, "data.dataset=folder", f"data.root={folder}", "epochs=2"]
    proc = subprocess.run([sys.executable, "-c", _KILL_IN_FIRST_CHECKPOINT, str(out), *sets],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in out.iterdir() if p.name.startswith(".last.")]  # the half-written checkpoint
    args = [a for kv in sets for a in ("--set", kv)]
    _one_line(*_cli("train", *args, "-o", out, "--resume"), "start it over without --resume")
    code, text = _cli("train", *args, "-o", out)
    assert code == 0 and "starting it over" in text, text
    assert [r["epoch"] for r in RunDir(out).metrics()] == [1, 2]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

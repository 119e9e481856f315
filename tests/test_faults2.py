"""Issue 27 (faults): the kill window between the lock and recipe.yaml, collapse outputs inside a run or
tree, symlinked outputs, reused PIDs, real full and read-only file systems, YAML alias bombs, resuming a
finished run, and hand-edited state and spec files: one line each, nothing lost."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from headsurgeon import HeadsurgeonError
from headsurgeon import recipe as R
from headsurgeon import storage
from headsurgeon.rundir import LOCK_FILE, RunDir

from test_faults import ROOT, TINY_SPLIT, _cli, _copy, _one_line, _sets, run  # noqa: F401  (the shared finished run)
from test_train import TINY, folder  # noqa: F401  (the tiny image-folder fixture)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir()}


# ------------------------------------------------------------------ 1. a kill between the lock and recipe.yaml

_KILL_AFTER_LOCK = textwrap.dedent("""
    # kill -9 this process right after it took the run's lock, before recipe.yaml is written
    import os, signal, sys
    from headsurgeon import recipe as R, train as T
    from headsurgeon.rundir import RunDir
    RunDir.clean_partial = lambda self: os.kill(os.getpid(), signal.SIGKILL)
    flat, _ = R.load(None, sys.argv[2:])
    T.train(flat, output=sys.argv[1], log=lambda m: None)
""")


def test_a_kill_between_the_lock_and_the_recipe_is_started_over_by_the_plain_rerun(folder, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    sets = [*TINY, "data.dataset=folder", f"data.root={folder}", "epochs=1"]
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_LOCK, str(out), *sets],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # the exact state of the kill: a dead process's lock
    args = [a for kv in sets for a in ("--set", kv)]
    _one_line(*_cli("train", *args, "-o", out, "--resume"), "start it over without --resume")
    code, text = _cli("train", *args, "-o", out)
    assert code == 0 and "starting it over" in text, text
    assert RunDir(out).summary()["finished"] and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_what_a_start_leaves_before_recipe_yaml_is_restartable_and_a_live_lock_is_not(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / LOCK_FILE).write_text(f"{_dead_pid()}\n")
    (d / ".recipe.yaml.tmp").write_text("epochs: ")  # killed while writing recipe.yaml
    (d / f"{LOCK_FILE}.123.tmp").write_text("12")  # killed while writing the lock
    rd = RunDir(d)
    assert rd.restartable() and rd.check_new() is True
    rd.lock()
    rd.clean_partial()
    assert sorted(p.name for p in d.iterdir()) == [LOCK_FILE]
    rd.unlock()
    (d / "notes.txt").write_text("mine")  # anything else: not a start's leftovers, refused as before
    (d / LOCK_FILE).write_text(f"{_dead_pid()}\n")
    assert not RunDir(d).restartable()
    with pytest.raises(HeadsurgeonError, match="is not empty; pass --resume"):
        RunDir(d).check_new()
    (d / "notes.txt").unlink()
    with subprocess.Popen(["sleep", "30"]) as live:
        try:
            (d / LOCK_FILE).write_text(f"{live.pid} {storage.process_start(live.pid)}\n")
            assert not RunDir(d).restartable()
            with pytest.raises(HeadsurgeonError, match=f"in use by process {live.pid}"):
                RunDir(d).check_unlocked()
        finally:
            live.kill()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="no /proc: start times are not recorded")
def test_a_lock_whose_pid_was_reused_is_stale(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    rd = RunDir(d)
    rd.lock()
    pid, start = map(int, (d / LOCK_FILE).read_text().split())
    assert pid == os.getpid() and start == storage.process_start(os.getpid())
    rd.unlock()
    with subprocess.Popen(["sleep", "30"]) as other:  # a live process that now has the PID of the lock's writer
        try:
            start = storage.process_start(other.pid)
            (d / LOCK_FILE).write_text(f"{other.pid} {start - 1}\n")
            assert RunDir(d).owner() is None  # another process than the one that wrote the lock: stale
            assert RunDir(d).restartable()  # and the folder is started over by the plain rerun
            (d / LOCK_FILE).write_text(f"{other.pid} {start}\n")
            assert RunDir(d).owner() == other.pid
            (d / LOCK_FILE).write_text(f"{other.pid}\n")  # a lock written before start times: the PID alone
            assert RunDir(d).owner() == other.pid
        finally:
            other.kill()


# ------------------------------------------------------------------ 2. collapse outputs inside a run or tree; links

def test_collapse_refuses_outputs_inside_a_run_or_a_tree(run, tmp_path):  # noqa: F811
    d = _copy(run, tmp_path)
    before = _bytes(d / "last")
    for target, match in ((d / "last", f"-o '{d / 'last'}' is inside the training run '{d}'"),
                          (d / "best" / "x", "is inside the training run"),
                          (d / "exports" / "m", "is inside the training run"),
                          (d / "best", "is inside the training run")):
        for overwrite in ([], ["--overwrite"]):
            code, out = _cli("collapse", d, "-o", target, *overwrite)
            _one_line(code, out, match)
            assert "still training" not in out and "another process" not in out, out
    assert _bytes(d / "last") == before and not (d / "exports").exists() and not (d / "best" / "x").exists()
    tree = d / "best"  # a tree folder of its own, collapsed into itself or below it
    t = tmp_path / "tree"
    shutil.copytree(tree, t)
    (t / "record.json").unlink()
    for target, match in ((t, "is the folder collapse reads from"), (t / "sub", f"is inside the head tree '{t}'")):
        _one_line(*_cli("collapse", t, "-o", target, "--overwrite"), match)
    assert sorted(p.name for p in t.iterdir()) == sorted(p.name for p in tree.iterdir() if p.name != "record.json")


def test_a_symlinked_output_is_refused_as_a_link(run, tmp_path):  # noqa: F811
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    for overwrite in ([], ["--overwrite"]):
        code, out = _cli("collapse", run, "-o", link, *overwrite)
        _one_line(code, out, f"output '{link}' is a symbolic link (to '{real}')")
        assert "another process" not in out and f"-o {real}" in out and "verified" not in out, out
    assert link.is_symlink() and not any(real.iterdir())
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    _one_line(*_cli("collapse", run, "-o", dangling), "is a symbolic link")
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()


# ------------------------------------------------------------------ 3. real full, read-only and size-limited disks

@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of its own (root only; skipped where mounting is not permitted), resizable and remountable."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")

    def remount(opts: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{opts}", str(mnt)], check=True)

    try:
        yield mnt, remount
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def test_a_real_full_and_read_only_disk_end_training_in_one_line(folder, small_fs, monkeypatch):  # noqa: F811
    from headsurgeon import rundir

    mnt, remount = small_fs
    d = mnt / "run"
    code, out = _cli("train", *_sets(folder), "-o", d, "--stop-after", "1")
    assert code == 0, out
    before = _bytes(d / "last")
    remount(f"size={_used(mnt) + _size(d / 'last') // 2}")  # epoch 2's best/ or last/ cannot be written whole
    code, out = _cli("train", *_sets(folder), "-o", d, "--resume")
    _one_line(code, out, "no space left on the device")
    assert ("the previous checkpoint is intact: free space, then continue with "
            f"`headsurgeon train --resume -o {d}`") in out
    assert _bytes(d / "last") == before and not [p for p in d.iterdir() if p.name.startswith(".")]
    remount("size=64m")
    real = rundir.RunDir.save_last

    def going_read_only(self, tree, state, *a, **k):  # the disk turns read-only before epoch 2's checkpoint
        if state["epoch"] == 2:
            remount("ro")
        return real(self, tree, state, *a, **k)

    monkeypatch.setattr(rundir.RunDir, "save_last", going_read_only)
    code, out = _cli("train", *_sets(folder), "-o", d, "--resume")
    _one_line(code, out, "read-only file system")
    assert "make the file system writable again (remount it read-write), then continue with `headsurgeon train " \
           f"--resume -o {d}`" in out, out
    assert _bytes(d / "last") == before
    monkeypatch.undo()
    remount("rw")
    code, out = _cli("train", *_sets(folder), "-o", d, "--resume")  # takes over the lock the read-only disk kept
    assert code == 0, out
    assert [r["epoch"] for r in RunDir(d).metrics()] == [1, 2, 3] and RunDir(d).summary()["finished"]


@pytest.mark.parametrize("command", ["collapse", "split"])
def test_a_real_full_disk_during_collapse_or_split_is_one_line_and_leaves_nothing(run, small_fs, command,  # noqa: F811
                                                                                  monkeypatch):
    mnt, remount = small_fs
    monkeypatch.setattr(storage, "check_space", lambda *a: None)  # split's size check would refuse it before writing
    remount("size=96k")
    target = mnt / "out"
    args = ["collapse", run] if command == "collapse" else ["split", *TINY_SPLIT, "--at", "layer4", "--heads", "2"]
    code, out = _cli(*args, "-o", target)
    _one_line(code, out, f"cannot write '{target}': no space left on the device")
    assert not any(mnt.iterdir())


_FILE_SIZE_LIMIT = textwrap.dedent("""
    # writes past RLIMIT_FSIZE fail with EFBIG (SIGXFSZ ignored), as under `ulimit -f`
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    from headsurgeon.cli import main
    main(sys.argv[1:])
""")


@pytest.mark.parametrize("command", ["collapse", "split"])
def test_a_file_size_limit_is_one_line(run, tmp_path, command):  # noqa: F811
    target = tmp_path / "out"
    args = ["collapse", str(run)] if command == "collapse" else ["split", *TINY_SPLIT, "--at", "layer4", "--heads", "2"]
    proc = subprocess.run([sys.executable, "-c", _FILE_SIZE_LIMIT, *args, "-o", str(target)],
                          capture_output=True, text=True, cwd=ROOT)
    _one_line(proc.returncode, proc.stdout + proc.stderr, f"cannot write '{target}': file too large")
    assert not target.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_library_write_errors_are_read_as_the_os_error_behind_them(tmp_path):
    import errno

    se = type("SafetensorError", (Exception,), {})("Error while serializing: I/O error: No space left on device "
                                                   "(os error 28)")
    assert storage.write_failure(se, tmp_path).errno == errno.ENOSPC
    torch_err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 248640 vs 248592")
    assert storage.write_failure(torch_err, tmp_path).errno in (errno.EIO, errno.EFBIG)  # a disk with room left
    assert storage.write_failure(ValueError("a bug"), tmp_path) is None
    assert storage.write_failure(KeyboardInterrupt(), tmp_path) is None


# ------------------------------------------------------------------ 4. YAML alias bombs, recursive aliases, odd keys

BOMB = "\n".join(["a: &a [" + ",".join(['"lol"'] * 9) + "]"]
                 + [f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefgh", "bcdefghi")]) + "\n"


@pytest.mark.parametrize("text, match", [
    (BOMB, "expand to more than 100,000 values"),
    ("data: {mean: &m [0.5, *m]}\n", "a recursive alias"),
    ("data: &d {batch_size: 4, again: *d}\n", "a recursive alias"),
    ("? {a: 1}\n: 2\n", "a mapping is used as a key"),
    ("? [epochs]\n: 2\n", "a list is used as a key"),
    ("- epochs\n- 2\n", "must be a YAML mapping of recipe keys, got list"),
    ("[" * 5000 + "]" * 5000 + "\n", "nested more than 100 levels deep"),
])
def test_yaml_that_is_not_a_bounded_mapping_is_one_line_fast(tmp_path, text, match):
    f = tmp_path / "r.yaml"
    f.write_text(text)
    t = time.perf_counter()
    with pytest.raises(HeadsurgeonError, match=match):
        R.load(f)
    code, out = _cli("recipe", f)
    _one_line(code, out, match)
    assert time.perf_counter() - t < 2, "the document must be refused before it is expanded"


def test_a_bomb_in_a_set_value_and_aliases_within_the_bound_still_work(tmp_path):
    inline = "[" + ", ".join(["&a [" + ",".join(["1"] * 9) + "]"]
                             + [f"&{c} [" + ",".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefg", "bcdefgh")]) + "]"
    t = time.perf_counter()
    with pytest.raises(HeadsurgeonError, match="expand to more than"):
        R.load(None, [f"model_kwargs={inline}"])
    assert time.perf_counter() - t < 2
    f = tmp_path / "r.yaml"
    f.write_text("data: {mean: &m [0.5, 0.5, 0.5], std: *m}\n")  # an ordinary alias
    flat, _ = R.load(f)
    assert flat.data.mean == flat.data.std == [0.5, 0.5, 0.5]


# ------------------------------------------------------------------ 5. resuming a finished run

def test_resuming_a_finished_run_says_so_and_exits_0(run, folder, tmp_path):  # noqa: F811
    d = _copy(run, tmp_path)
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    code, out = _cli("train", *_sets(folder), "-o", d, "--resume")
    assert code == 0 and "Error" not in out, out
    assert f"run '{d}' already finished its 3 epochs: nothing to train" in out and "--set epochs=6" in out, out
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before  # nothing changed, no lock left


# ------------------------------------------------------------------ 6. hand-edited or corrupt state and spec files

@pytest.mark.parametrize("edit, match", [
    (lambda s: {**s, "optimizer": {}}, "optimizer is not an optimizer's state"),
    (lambda s: {**s, "optimizer": {"state": {}, "param_groups": "x"}}, "optimizer is not an optimizer's state"),
    (lambda s: {**s, "history": [1, 2, 3]}, "history entry 1 is not the row of epoch 1"),
    (lambda s: {**s, "history": [dict(h, epoch=9) for h in s["history"]]}, "history entry 1"),
    (lambda s: {**s, "history": [{**h, "val": {"heads": []}} for h in s["history"]]}, "history epoch 1 val"),
    (lambda s: {**s, "history": [*s["history"][:2], {**s["history"][2], "test": {**s["history"][2]["test"],
                "heads": s["history"][2]["test"]["heads"][:2]}}]}, "2 heads where earlier epochs have 4"),
    (lambda s: {**s, "best": {"epoch": 3, "head": 9, "val_top1": 50.0}}, "best {'epoch': 3, 'head': 9"),
    (lambda s: {**s, "best": "x"}, "best 'x'"),
    (lambda s: {**s, "rng": "x"}, "rng is not a list of RNG states"),
    (lambda s: {**s, "wall_time_s": "x"}, "wall_time_s 'x'"),
    (lambda s: {**s, "scheduler": [1]}, "scheduler is list, not a state dict"),
])
def test_an_edited_state_file_is_one_line(run, folder, tmp_path, edit, match):  # noqa: F811
    d = _copy(run, tmp_path)
    state = d / "last" / "state.pt"
    torch.save(edit(torch.load(state, weights_only=True)), state)
    before = sorted(p.name for p in d.iterdir())
    code, out = _cli("train", *_sets(folder, "epochs=4"), "-o", d, "--resume")
    _one_line(code, out, "last/state.pt is invalid (")
    assert match in out and "was it edited?" in out, out
    assert sorted(p.name for p in d.iterdir()) == before


@pytest.mark.parametrize("edit, match", [
    (lambda s: dict(s, input_size=[3, 100000, 100000]), "input_size 3x100000x100000 is 30,000,000,000 values"),
    (lambda s: dict(s, input_size=[3, 16]), "input_size [3, 16] is not three positive integers"),
    (lambda s: dict(s, pretrained_cfg=dict(s["pretrained_cfg"], input_size=[3, 10**6, 10**6])),
     "pretrained_cfg.input_size 3x1000000x1000000"),
    (lambda s: dict(s, heads=10**6, fanout=[1000, 1000]), ("does not fit the tree its spec.json describes (the spec "
                                                          "says 1000000 heads, fan-out [1000, 1000]: 1000 copies at "
                                                          "level 1, but the weights hold 2)")),
    (lambda s: dict(s, heads=8, fanout=[2, 4]), "8 heads, fan-out [2, 4]: 8 copies at level 2, but the weights hold 4"),
])
def test_an_edited_spec_is_one_line_before_anything_is_built(run, tmp_path, edit, match):  # noqa: F811
    t = tmp_path / "tree"
    shutil.copytree(run / "best", t)
    spec = t / "spec.json"
    spec.write_text(json.dumps(edit(json.loads(spec.read_text()))))
    t0 = time.perf_counter()
    code, out = _cli("collapse", t, "-o", tmp_path / "m")
    _one_line(code, out, match)
    assert time.perf_counter() - t0 < 60 and not (tmp_path / "m").exists()

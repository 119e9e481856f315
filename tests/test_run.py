"""The run directory under faults and the objectives inside the training loop."""
import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from headsurgeon import HeadsurgeonError
from headsurgeon import train as T
from headsurgeon.rundir import LOCK_FILE, RunDir

from test_train import _recipe, folder  # noqa: F401  (the tiny image-folder fixture)


def _quiet(m):
    return None


@pytest.mark.parametrize("objective", ["dml", "one", "kdcl"])
def test_each_objective_trains_logs_its_terms_and_names_itself(folder, tmp_path, objective):  # noqa: F811
    out = tmp_path / "run"
    s = T.train(_recipe(folder, f"loss.objective={objective}", "epochs=1"), output=str(out), log=_quiet)
    want = {"dml": 1.0, "one": 3.0, "kdcl": 3.0}[objective]
    assert s["objective"]["name"] == objective and s["objective"]["temperature"] == want  # the objective's default
    row = json.loads((out / "metrics.jsonl").read_text())
    terms = row["loss_terms"]
    assert terms["objective"] == objective and len(terms["hard"]) == len(terms["soft"]) == 4
    assert all(h > 0 for h in terms["hard"]) and all(v >= 0 for v in terms["soft"])
    assert ("teacher_ce" in terms) == (objective == "one")
    assert (out / "last" / "objective.safetensors").is_file() == (objective == "one")


def test_one_gate_is_trained_checkpointed_and_resumed_exactly(folder, tmp_path):  # noqa: F811
    flat = _recipe(folder, "loss.objective=one")
    straight, parts = tmp_path / "a", tmp_path / "b"
    T.train(flat, output=str(straight), log=_quiet)
    T.train(flat, output=str(parts), stop_after=1, log=_quiet)
    gate1 = safetensors.torch.load_file(str(parts / "last" / "objective.safetensors"))
    assert any(v.abs().sum() > 0 for v in gate1.values())  # the gate (zero-initialised) learned
    T.train(flat, output=str(parts), resume=True, log=_quiet)
    for name in ("tree.safetensors", "objective.safetensors"):
        a = safetensors.torch.load_file(str(straight / "last" / name))
        b = safetensors.torch.load_file(str(parts / "last" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_cl_terms_reproduce_the_logged_loss(folder, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    T.train(_recipe(folder, "epochs=1"), output=str(out), log=_quiet)
    row = json.loads((out / "metrics.jsonl").read_text())
    t = row["loss_terms"]
    assert t["objective"] == "cl"
    assert sum(0.5 * h + 0.5 * s for h, s in zip(t["hard"], t["soft"])) == pytest.approx(row["train_loss"], rel=1e-4)


def test_best_checkpoint_carries_the_record_of_its_own_epoch(folder, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    s = T.train(_recipe(folder, "epochs=3"), output=str(out), log=_quiet)
    record = json.loads((out / "best" / "record.json").read_text())
    assert record["best_epoch"] == s["best_epoch"] and record["heads"] == s["heads"]
    assert record["epochs_done"] == s["best_epoch"]  # written with the weights of that epoch


def test_a_live_writer_is_named_and_a_stale_lock_is_taken_over(folder, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(f"{sleeper.pid}\n")
        for resume in (False, True):
            with pytest.raises(HeadsurgeonError, match=f"in use by process {sleeper.pid}"):
                T.train(_recipe(folder), output=str(out), resume=resume, log=_quiet)
    finally:
        sleeper.kill()
        sleeper.wait()
    # the process is gone: its lock is stale; a run that stopped early leaves a resumable directory
    (out / LOCK_FILE).unlink()
    T.train(_recipe(folder), output=str(out), stop_after=1, log=_quiet)
    (out / LOCK_FILE).write_text(f"{sleeper.pid}\n")
    leftover = out / ".last.abc123"
    leftover.mkdir()
    (leftover / "tree.safetensors").write_bytes(b"half")
    s = T.train(_recipe(folder), output=str(out), resume=True, log=_quiet)
    assert s["finished"] and not leftover.exists() and not (out / LOCK_FILE).exists()


def test_run_dir_lock_is_exclusive_within_one_machine(tmp_path):
    a = RunDir(tmp_path / "r")
    a.lock()
    assert (tmp_path / "r" / LOCK_FILE).read_text().split()[0] == str(os.getpid())  # "PID start-time"
    a.unlock()
    assert not (tmp_path / "r" / LOCK_FILE).exists()


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_written_between_the_checks_and_the_lock_is_left_alone(folder, tmp_path, monkeypatch, resume):  # noqa: F811
    """Two starts on one folder: the other finishes (or moves on) while this one loads its data, before
    it takes the lock. This one must not then overwrite that run, nor resume it from the older state."""
    from headsurgeon import data as D

    out = tmp_path / "run"
    if resume:
        T.train(_recipe(folder), output=str(out), stop_after=1, log=_quiet)
    splits, calls = D.splits, []

    def other_run_meanwhile(recipe):
        calls.append(1)
        if len(calls) == 1:  # this start passed its checks; the other one runs to the end now
            T.train(_recipe(folder), output=str(out), resume=resume, log=_quiet)
        return splits(recipe)

    monkeypatch.setattr(D, "splits", other_run_meanwhile)
    with pytest.raises(HeadsurgeonError, match="changed while this run was starting"):
        T.train(_recipe(folder), output=str(out), resume=resume, log=_quiet)
    monkeypatch.undo()
    s = json.loads((out / "summary.json").read_text())
    assert s["finished"] and s["epochs_done"] == 2 and not (out / LOCK_FILE).exists()
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_an_interrupt_says_what_was_kept_and_how_to_go_on(folder, tmp_path, monkeypatch):  # noqa: F811
    out, said = tmp_path / "run", []
    real_fit = T.fit

    def interrupted(run, stop_after):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        T.train(_recipe(folder), output=str(out), log=said.append)
    assert "before the first epoch finished" in said[-1] and not out.exists()  # it made the folder: nothing left
    monkeypatch.setattr(T, "fit", real_fit)
    T.train(_recipe(folder), output=str(out), stop_after=1, log=_quiet)  # the same command starts it over
    monkeypatch.setattr(T, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        T.train(_recipe(folder), output=str(out), resume=True, log=said.append)
    assert said[-1] == (f"interrupted with 1 epoch(s) finished in '{out}'; continue with "
                        f"`headsurgeon train --resume -o {out}`")
    monkeypatch.setattr(T, "fit", real_fit)
    assert T.train(_recipe(folder), output=str(out), resume=True, log=_quiet)["finished"]


def test_a_checkpoint_a_killed_overwrite_left_as_old_is_put_back(folder, tmp_path, monkeypatch):  # noqa: F811
    """Where folders cannot be swapped in one step, a kill between the two renames of a checkpoint
    overwrite leaves last/ only as .last.old: --resume puts it back and continues from it."""
    out = tmp_path / "run"
    T.train(_recipe(folder), output=str(out), stop_after=1, log=_quiet)
    (out / "last").rename(out / ".last.old")
    s = T.train(_recipe(folder), output=str(out), resume=True, log=_quiet)
    assert s["finished"] and not (out / ".last.old").exists()
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]

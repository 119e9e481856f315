"""``headsurgeon compare``: paired cells, resumable, parallel, its statistics checked by hand."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from headsurgeon import compare as C
from headsurgeon.cli import main
from headsurgeon.errors import HeadsurgeonError

TINY = ["epochs=1", "data.img_size=16", "data.train_fraction=0.25", "data.batch_size=32"]


def _lines(root: Path) -> list[str]:
    return (root / C.CELLS_FILE).read_text().splitlines()


def test_builtin_variants_resolve_the_last_two_stages_and_every_tree_builds():
    from headsurgeon import recipe as R

    base, _ = R.load(None, [])
    assert C.split_points(base) == ("layer3", "layer4")  # resnet10t's last two feature_info stages
    _, sets = C.plan(None, list(C.BUILTIN))  # each variant's recipe loads and its tree builds (no data)
    assert set(sets) == set(C.BUILTIN)
    assert sets["hier4"][:3] == ["split.at=[layer3, layer4]", "split.heads=4", "split.fanout=[2, 2]"]
    assert "split.rescale=false" in sets["hier4-norescale"] and "loss.beta=1.0" in sets["ind4"]
    assert sets["single"][:3] == ["split.at=[]", "split.heads=1", "split.fanout=null"]
    # a named variant sets the whole split and the objective: the recipe's own never leaks in
    _, sets = C.plan(None, ["hier4"], ["loss.objective=dml", "split.at=[input]", "split.heads=2"])
    flat, _ = __import__("headsurgeon.recipe", fromlist=["load"]).load(None, ["loss.objective=dml", *sets["hier4"]])
    assert flat.loss.objective == "cl" and flat.split.at == ["layer3", "layer4"] and flat.split.heads == 4


def test_mcnemar_is_the_exact_binomial_test():
    # b=10, c=2: p = 2 * sum_{k<=2} C(12, k) / 2^12
    assert C.mcnemar(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096, rel=1e-12)
    assert C.mcnemar(5, 5) == pytest.approx(1.0) and C.mcnemar(0, 0) == 1.0
    assert C.mcnemar(0, 7) == pytest.approx(2 / 2 ** 7, rel=1e-12)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp") / "s"
    res = C.compare(None, ["inst2"], root, seeds="0,1", noise="0", sets=TINY, log=lambda m: None)
    return root, res


def test_cells_pair_by_seed_and_the_report_is_the_hand_computed_paired_statistic(study):
    root, res = study
    cells = {c["key"]: c for c in map(json.loads, _lines(root))}
    assert set(cells) == {"single-n0-s0", "inst2-n0-s0", "single-n0-s1", "inst2-n0-s1"}
    assert all(c["status"] == "ok" for c in cells.values())
    # paired: the same seed draws the data order, init and noise for both variants
    assert "seed=1" in cells["inst2-n0-s1"]["overrides"] and "seed=1" in cells["single-n0-s1"]["overrides"]
    d = [cells[f"inst2-n0-s{s}"]["best"]["deployed"] - cells[f"single-n0-s{s}"]["best"]["deployed"] for s in (0, 1)]
    row = res["stats"]["0"]["inst2"]
    assert row["gain_deployed"] == pytest.approx((d[0] + d[1]) / 2, abs=1e-12)
    assert row["se_deployed"] == pytest.approx(abs(d[0] - d[1]) / 2, abs=1e-12)  # sd/sqrt(2) of two values
    e = [cells[f"inst2-n0-s{s}"]["best"]["ensemble"] - cells[f"single-n0-s{s}"]["best"]["deployed"] for s in (0, 1)]
    assert row["gain_ensemble"] == pytest.approx(sum(e) / 2, abs=1e-12)
    # McNemar from the saved predictions, recounted here; the deployed head's predictions score what the run said
    b = c = n = 0
    for s in (0, 1):
        zv, zs = (np.load(root / "predictions" / f"{k}-n0-s{s}.npz") for k in ("inst2", "single"))
        cv, cs = cells[f"inst2-n0-s{s}"], cells[f"single-n0-s{s}"]
        rv = zv["best_preds"][cv["best_head"]] == zv["labels"]
        rs = zs["best_preds"][0] == zs["labels"]
        assert 100 * rv.mean() == pytest.approx(cv["best"]["deployed"], abs=1e-9)
        b, c, n = b + int((rv & ~rs).sum()), c + int((~rv & rs).sum()), n + len(rv)
    assert row["mcnemar"] == {"only_variant": b, "only_single": c, "images": n, "p": C.mcnemar(b, c)}
    text = (root / "report.md").read_text()
    assert f"| inst2 | 2 | 2 | " in text and f"{row['gain_deployed']:+.2f} ± {row['se_deployed']:.2f}" in text
    assert "headsurgeon collapse " in text and (root / "compare.png").stat().st_size > 5000
    assert "Regime: the single model ends at" in text and "Rule 1" in text


def test_a_rerun_with_more_seeds_runs_only_the_new_cells(study, tmp_path):
    root, _ = study
    before = _lines(root)
    logs = []
    C.compare(None, ["inst2"], root, seeds="0,1,2", noise="0", sets=TINY, log=logs.append)
    after = _lines(root)
    assert after[: len(before)] == before and len(after) == len(before) + 2  # finished lines never rewritten
    assert "2 to run" in logs[0] and {json.loads(x)["key"] for x in after[len(before):]} == {"single-n0-s2", "inst2-n0-s2"}
    # the same recipe with another --set would not pair: one line, nothing written
    with pytest.raises(HeadsurgeonError, match="another recipe"):
        C.compare(None, ["inst2"], root, seeds="0", sets=[*TINY, "optim.lr=0.5"], log=lambda m: None)
    assert _lines(root) == after


def test_report_reprints_from_the_folder(study):
    root, _ = study
    r = CliRunner().invoke(main, ["compare", str(root), "--report"])
    assert r.exit_code == 0, r.output
    assert r.output == (root / "report.md").read_text() + "\n"


@pytest.mark.parametrize("args,match", [
    (["--variant", "nope"], "unknown variant"),
    (["--variant", "hier4", "--seeds", "0,x"], "--seeds"),
    (["--variant", "hier4", "--seeds", "1,1"], "distinct"),
    (["--variant", "hier4", "--noise", "1.5"], "--noise"),
    (["--variant", "hier4", "--set", "model=[resnet10t, resnet10t]"], "peers"),
    (["--variant", "hier4", "--jobs", "0"], "--jobs"),
    ([], "at least one --variant"),
    (["--variant", "hier4", "--slurm-gpus", "1"], "--executor slurm"),
])
def test_bad_input_is_one_line_before_anything_is_written(tmp_path, args, match):
    out = tmp_path / "o"
    r = CliRunner().invoke(main, ["compare", *args, "-o", str(out)])
    assert r.exit_code != 0 and match in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()


def test_a_variant_that_does_not_fit_the_recipe_is_refused_before_training(tmp_path):
    # a user variant naming a split point the model lacks: refused by the tree check, not after an epoch
    vf = tmp_path / "v.yaml"
    vf.write_text("deep: {split.at: [layer9], split.heads: 2}\n")
    with pytest.raises(HeadsurgeonError, match="variant 'deep'.*does not fit the recipe.*layer9"):
        C.compare(None, ["deep"], tmp_path / "o", variants_file=vf, sets=TINY, log=lambda m: None)
    assert not (tmp_path / "o").exists()
    vf.write_text("single: {loss.label_smoothing: 0.1}\n")
    with pytest.raises(HeadsurgeonError, match="built-in variant name"):
        C.compare(None, ["single"], tmp_path / "o", variants_file=vf, log=lambda m: None)


def test_a_failing_cell_is_recorded_and_retried_and_the_others_go_on(tmp_path, monkeypatch):
    import headsurgeon.train as T

    real = T.train

    def flaky(recipe, name="run", **kw):
        if name == "ls":
            raise HeadsurgeonError("disk on fire")
        return real(recipe, name=name, **kw)

    monkeypatch.setattr(T, "train", flaky)
    vf = tmp_path / "v.yaml"
    vf.write_text("ls: {loss.label_smoothing: 0.1}\n")
    root = tmp_path / "s"
    res = C.compare(None, ["ls"], root, seeds="0", variants_file=vf, sets=TINY, log=lambda m: None)
    cells = [json.loads(x) for x in _lines(root)]
    assert [c["status"] for c in cells] == ["ok", "failed"] and cells[1]["error"] == "disk on fire"
    assert "ls-n0-s0: disk on fire" in (root / "report.md").read_text() and res["failed"]
    monkeypatch.setattr(T, "train", real)
    logs = []
    res = C.compare(None, ["ls"], root, seeds="0", variants_file=vf, sets=TINY, log=logs.append)
    assert "1 to run" in logs[0] and not res["failed"] and "gain_deployed" in res["stats"]["0"]["ls"]
    assert len(_lines(root)) == 3  # the failure stays in the log; the retry is the cell's last line


def test_one_coordinator_per_study(tmp_path):
    import fcntl

    root = tmp_path / "s"
    root.mkdir()
    fd = os.open(root / C.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another `headsurgeon compare` holds it
    try:
        with pytest.raises(HeadsurgeonError, match="in use by another"):
            C.compare(None, ["inst2"], root, seeds="0", sets=TINY, log=lambda m: None)
    finally:
        os.close(fd)


def test_kill_9_mid_study_loses_only_the_cell_in_flight(tmp_path):
    root = tmp_path / "s"
    cmd = [sys.executable, "-m", "headsurgeon", "compare", "--variant", "inst2", "--seeds", "0,1", "-o", str(root),
           *[x for s in [*TINY[1:], "epochs=3"] for x in ("--set", s)]]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    cells = root / C.CELLS_FILE
    t0 = time.time()
    while not (cells.is_file() and cells.read_text().count("\n") >= 1):
        assert p.poll() is None and time.time() - t0 < 300, "compare ended before its first cell"
        time.sleep(0.2)
    time.sleep(1.0)  # into the next cell's training
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    first = cells.read_text().splitlines()
    assert len(first) in (1, 2)
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = cells.read_text().splitlines()
    assert lines[: len(first)] == first and len(lines) == 4
    assert all(json.loads(x)["status"] == "ok" for x in lines)
    assert f"{4 - len(first)} to run" in r.stdout


def test_a_cell_a_worker_finished_is_harvested_not_retrained(study, tmp_path):
    import shutil

    root = tmp_path / "s"
    shutil.copytree(study[0], root)
    lines = _lines(root)
    (root / C.CELLS_FILE).write_text("\n".join(lines[:-1]) + "\n")  # the coordinator died before recording it
    lost = json.loads(lines[-1])["key"]
    shutil.rmtree(root / "runs" / lost / "last")  # retraining would have to start over: it must not happen
    logs = []
    # the study's own seeds: the shared fixture has 2 or, after the more-seeds test, 3 (no order dependence)
    seeds = ",".join(map(str, sorted({json.loads(x)["seed"] for x in lines})))
    C.compare(None, ["inst2"], root, seeds=seeds, noise="0", sets=TINY, log=logs.append)
    assert "0 to run" in logs[0] and _lines(root)[-1] == lines[-1]


def test_parallel_workers_and_submitit_give_the_serial_results(study, tmp_path):
    """Cells are deterministic on CPU: two spawned workers and submitit's local executor train the same
    cells to the same numbers as the serial study."""
    serial = {c["key"]: c for c in map(json.loads, _lines(study[0]))}
    for executor in ("process", "submitit-local"):
        root = tmp_path / executor
        C.compare(None, ["inst2"], root, seeds="0", noise="0", sets=TINY, jobs=2, executor=executor, log=lambda m: None)
        got = {c["key"]: c for c in map(json.loads, _lines(root))}
        assert set(got) == {"single-n0-s0", "inst2-n0-s0"}
        for k, c in got.items():
            assert c["best"] == serial[k]["best"] and c["final"] == serial[k]["final"], (executor, k)


def test_the_docs_variants_file_plans(tmp_path):
    """docs/compare.md's variants.yaml is valid over the embedded recipe: each variant loads and its tree builds."""
    import re

    text = (Path(__file__).parents[1] / "docs" / "compare.md").read_text()
    block = re.search(r"```yaml\n# variants.yaml\n(.*?)```", text, re.S).group(1)
    vf = tmp_path / "variants.yaml"
    vf.write_text(block)
    _, sets = C.plan(None, ["wide-one", "ls", "peers"], ["data.img_size=32"], vf)
    assert set(sets) == {"single", "wide-one", "ls", "peers"} and "loss.label_smoothing=0.1" in sets["ls"]


def test_slurm_jobs_get_the_requested_resources(tmp_path, monkeypatch):
    """No Slurm here: a fake `srun` on PATH lets submitit build its Slurm executor, whose parameters are what
    sbatch would get; without one, --executor slurm is one line."""
    with pytest.raises(HeadsurgeonError, match="--executor slurm: .*srun.*--executor process"):
        monkeypatch.setenv("PATH", str(tmp_path))
        C._executor("slurm", tmp_path / "s", 2, {})
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ.get('PATH', '')}")
    ex = C._executor("slurm", tmp_path / "s", 2, {"partition": "gpu", "gpus": 1, "cpus": 8, "timeout_min": 90})
    p = ex.ex._executor.parameters
    assert (p["partition"], p["gpus_per_node"], p["cpus_per_task"], p["time"]) == ("gpu", 1, 8, 90)


def test_cli_help_names_every_builtin_variant():
    from headsurgeon.cli import main

    opt = next(p for p in main.commands["compare"].params if p.name == "variants")
    assert [v for v in C.BUILTIN if v not in opt.help.replace(",", " ").split()] == []


def test_a_recipe_with_a_beta_schedule_is_refused_for_builtin_variants():
    """loss.beta_end in the base would turn ind4 into a schedule and fail dml/kdcl/one/pcl: one line, before any cell."""
    with pytest.raises(HeadsurgeonError, match=r"the recipe sets loss.beta_end .* compare the built-in hier4-late"):
        C.plan(None, ["ind4"], ["loss.beta_end=0.1"])
    _, sets = C.plan(None, ["hier4-late", "ind4"])
    assert sets["hier4-late"][-2:] == ["loss.beta=1.0", "loss.beta_end=0.1"] and "loss.beta_end=0.1" not in sets["ind4"]

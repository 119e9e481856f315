"""Tracking: summary.csv (timm's update_summary), TensorBoard event files and an offline W&B run,
each checked against the run's own metrics.jsonl; a resumed run continues them; a missing extra is one line."""
from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from headsurgeon import recipe as R
from headsurgeon import train as T
from headsurgeon.cli import main
from headsurgeon.errors import HeadsurgeonError

TINY = ["model=resnet10t", "model_kwargs={channels: [8, 16, 32, 64], stem_width: 8}", "split.at=[layer4]",
        "split.heads=2", "data.img_size=16", "data.train_fraction=0.2", "data.batch_size=32", "epochs=2", "seed=3"]


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """W&B strictly on this machine: offline mode, and any request it tried would go to a closed local port."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_dead_port()}")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_summary_csv_tensorboard_and_wandb_carry_the_metrics(tmp_path, offline):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    flat, _ = R.load(None, [*TINY, "log.tensorboard=true", "log.wandb=true", "log.wandb_project=hs-test"])
    out = tmp_path / "run"
    lines: list[str] = []
    s = T.train(flat, output=str(out), log=lines.append)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and s["finished"]

    # summary.csv: timm's columns, one row per epoch, the same numbers as metrics.jsonl
    rows = _rows(out / "summary.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r, m in zip(rows, metrics):
        chosen = max(range(2), key=lambda h: m["val"]["heads"][h]["top1"])
        assert float(r["train_loss"]) == pytest.approx(m["train_loss"])
        assert float(r["lr"]) == pytest.approx(m["lr"])
        assert float(r["eval_top1"]) == m["val"]["heads"][chosen]["top1"]
        assert int(float(r["eval_chosen_head"])) == chosen
        for i in range(2):
            assert float(r[f"eval_top5_head{i}"]) == m["val"]["heads"][i]["top5"]
            assert float(r[f"eval_test_top1_head{i}"]) == m["test"]["heads"][i]["top1"]
            assert float(r[f"train_hard_head{i}"]) == pytest.approx(m["loss_terms"]["hard"][i])
            assert float(r[f"train_soft_head{i}"]) == pytest.approx(m["loss_terms"]["soft"][i])
            assert float(r[f"train_top1_head{i}"]) == m["train_top1"][i]
        assert float(r["eval_test_top1_ensemble"]) == m["test"]["ensemble"]["top1"]
        assert float(r["train_images_per_s"]) > 0
    assert int(float(rows[-1]["eval_best_head"])) == s["best_head"]

    # TensorBoard: every per-head and ensemble curve, stepped by epoch
    tb = _scalars(out / "tensorboard")
    for split in ("val", "test"):
        for k in ("top1", "top5"):
            for who, got in [(f"head{i}", [m[split]["heads"][i][k] for m in metrics]) for i in range(2)] + \
                    [("ensemble", [m[split]["ensemble"][k] for m in metrics])]:
                assert tb[f"{split}/{k}/{who}"] == [(e, pytest.approx(v)) for e, v in zip((1, 2), got)]
    for tag in ("loss/hard/head0", "loss/soft/head1", "train/lr", "train/loss", "train/images_per_s",
                "train/top1/head1", "chosen/head"):
        assert [st for st, _ in tb[tag]] == [1, 2], tag
    assert tb["chosen/head"][-1][1] == s["best_head"]
    assert tb["loss/soft/head1"][0][1] == pytest.approx(metrics[0]["loss_terms"]["soft"][1])

    # W&B, offline: a run in RUN/wandb whose config is the recipe, with the same numbers per epoch
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    assert (out / "wandb" / "run-id").read_text().strip() in runs[0].name
    config, history = _wandb_file(next(runs[0].glob("*.wandb")))
    assert config == json.loads(json.dumps(flat.nested()))
    assert [int(h["epoch"]) for h in history] == [1, 2]
    for h, m in zip(history, metrics):
        assert h["test/top1/ensemble"] == pytest.approx(m["test"]["ensemble"]["top1"])
        assert h["loss/hard/head1"] == pytest.approx(m["loss_terms"]["hard"][1])
    assert any("Weights & Biases run" in x and "offline" in x for x in lines)


def _wandb_file(path: Path) -> tuple[dict, list[dict]]:
    """The config and history rows of an offline W&B run file (a LevelDB-log of protobuf records
    after a 7-byte ``:W&B`` header), read with wandb's own protobuf classes."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    config: dict = {}
    history: list[dict] = []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if n == 0 and kind == 0:  # block trailer / padding
            pos += left
            continue
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            r = pb.Record()
            r.ParseFromString(buf)
            buf = b""
            which = r.WhichOneof("record_type")
            if which == "run":
                config.update({_key(u): json.loads(u.value_json) for u in r.run.config.update if _key(u) != "_wandb"})
            elif which == "history":
                history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
    return config, history


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_a_resumed_run_continues_its_summary_csv_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    flat, _ = R.load(None, [*TINY, "epochs=3", "log.tensorboard=true"])
    out = tmp_path / "run"
    T.train(flat, output=str(out), stop_after=2, log=lambda m: None)
    # pretend the kill came after epoch 2 was logged but before its checkpoint: the rows of epoch 2 repeat
    T.train(flat, output=str(out), resume=True, log=lambda m: None)
    assert [int(r["epoch"]) for r in _rows(out / "summary.csv")] == [1, 2, 3]
    assert [st for st, _ in _scalars(out / "tensorboard")["val/top1/ensemble"]] == [1, 2, 3]


def test_summary_csv_is_written_without_any_tracker(tmp_path):
    flat, _ = R.load(None, [*TINY, "epochs=1"])
    T.train(flat, output=str(tmp_path / "r"), log=lambda m: None)
    rows = _rows(tmp_path / "r" / "summary.csv")
    assert len(rows) == 1 and {"epoch", "train_loss", "eval_top1", "eval_top5", "lr"} <= set(rows[0])
    assert not (tmp_path / "r" / "tensorboard").exists() and not (tmp_path / "r" / "wandb").exists()


@pytest.mark.parametrize("key", ["tensorboard", "wandb"])
def test_a_missing_extra_is_one_line_naming_it(key, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == key else real(name, *a))
    with pytest.raises(HeadsurgeonError, match=rf"pip install 'headsurgeon\[{key}\]'"):
        R.load(None, [f"log.{key}=true"])
    r = CliRunner().invoke(main, ["train", "--set", f"log.{key}=true", "-o", str(tmp_path / "r")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert f"'log.{key}: true' needs the {key} package" in r.output and "headsurgeon[" in r.output
    assert not (tmp_path / "r").exists()  # refused before any work


def test_logging_keys_may_change_on_resume():
    a, _ = R.load(None, [])
    b, _ = R.load(None, ["log.tensorboard=true"] if _has("tensorboard") else ["log.wandb_project=other"])
    assert R.diff(a, b) == []


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_a_failed_wandb_start_is_one_line_and_leaves_nothing(tmp_path, offline, monkeypatch):
    """wandb.init refused (not logged in, no network): one line naming the fix, before any training, and
    no run directory (recipe.yaml, wandb/) left behind for a run that never started."""
    wandb = pytest.importorskip("wandb")

    def refuse(**kw):
        raise wandb.errors.UsageError("api_key not configured (no-tty).\ncall wandb.login(key=[your_api_key])")

    monkeypatch.setattr(wandb, "init", refuse)
    flat, _ = R.load(None, [*TINY, "log.wandb=true"])
    out = tmp_path / "run"
    with pytest.raises(HeadsurgeonError, match=r"^log.wandb: wandb.init failed: api_key not configured \(no-tty\)\. "
                                               r"\(run `wandb login`"):
        T.train(flat, output=str(out), log=lambda m: None)
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    out.mkdir()  # a folder made empty beforehand is left empty
    with pytest.raises(HeadsurgeonError, match="wandb.init failed"):
        T.train(flat, output=str(out), log=lambda m: None)
    assert out.is_dir() and not any(out.iterdir()), sorted(p.name for p in out.rglob("*"))


def test_a_scheduled_beta_is_a_scalar_and_a_csv_column():
    from headsurgeon import tracking

    ev = {"heads": [{"top1": 50.0, "top5": 90.0}], "ensemble": {"top1": 50.0, "top5": 90.0}}
    row = {"epoch": 3, "lr": 0.1, "train_loss": 1.5, "train_top1": [40.0], "val": ev, "test": ev,
           "loss_terms": {"hard": [1.0], "soft": [0.5]}}
    assert "loss/beta" not in tracking.scalars(row)
    assert tracking.scalars({**row, "beta": 0.55})["loss/beta"] == 0.55
    assert tracking.csv_columns({**row, "beta": 0.55})[0]["beta"] == 0.55

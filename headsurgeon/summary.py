"""The schema of a run's result files: ``summary.json``, ``best/record.json`` and the rows of ``metrics.jsonl``.

One module says what these files hold, checks them, and merges a record over a summary, so that
``collapse``, the card and the demo read a run the same way. Their file names belong to
:mod:`headsurgeon.rundir` (the layout); this module only knows their contents.

The types are ``TypedDict``\\ s, not pydantic models: the files are JSON objects that ``train`` writes
and every reader takes as plain dicts (the bytes on disk, their key order and old runs' extra or
missing keys stay as they are), and a hand-written check words each problem as the one-line error
the user sees (a pydantic error would be a multi-line list of locations).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, TypedDict

from .errors import HeadsurgeonError


class Scores(TypedDict):
    """One model's accuracy (%) on one split."""
    top1: float
    top5: float


class Evaluation(TypedDict):
    """One split of one epoch: each head's and the ensemble's scores (``EpochRow.val``/``test``)."""
    heads: list[Scores]
    ensemble: Scores


class _EpochRequired(TypedDict):
    epoch: int
    lr: float
    train_loss: float
    train_top1: list[float]
    loss_terms: dict[str, Any]  # the objective's name, per-head "hard"/"soft", optionally "teacher_ce"
    time_s: float


class EpochRow(_EpochRequired, total=False):
    """One line of ``metrics.jsonl`` (and one entry of the checkpoint's history): ``val``/``test`` only on
    evaluated epochs (recipe ``eval_every``), ``fit`` with recipe ``log.fit_every``."""
    val: Evaluation
    test: Evaluation
    fit: dict[str, Any]


class HeadResult(TypedDict, total=False):
    """One head's accuracies at the best epoch (``val_top1`` and ``test_top1`` are always there)."""
    index: int
    val_top1: float
    val_top5: float
    test_top1: float
    test_top5: float


class _SummaryRequired(TypedDict):
    best_epoch: int
    best_head: int
    heads: list[HeadResult]


class RunSummary(_SummaryRequired, total=False):
    """``summary.json`` (the run's progress and its best epoch) and ``best/record.json`` (the same as of
    the epoch whose weights ``best/`` holds). Older runs may lack the optional keys."""
    run: str
    finished: bool
    epochs_done: int
    epochs: int
    ensemble: dict[str, float]
    objective: dict[str, Any]
    weights: str  # "ema" or "model"
    best_dir: str
    num_classes: int
    label_names: Optional[list[str]]
    samples: dict[str, int]
    label_noise: dict[str, Any]
    device: str
    world_size: int
    parallel: str  # the layout the last epoch trained under (recipe parallel; ddp in one process)
    wall_time_s: float


# what best/record.json says about the weights in best/: it wins over summary.json for these keys
RECORD_KEYS = ("best_epoch", "best_head", "heads", "ensemble", "objective", "weights", "num_classes", "label_names",
               "samples", "label_noise")


def merge(summary: Mapping[str, Any] | None, record: Mapping[str, Any] | None) -> tuple[RunSummary | None, bool]:
    """The summary to label ``best/`` with, and whether ``summary.json`` described another checkpoint.

    ``best/record.json`` is written in one atomic step with the weights it describes, so it gives
    everything about them (:data:`RECORD_KEYS`); ``summary.json`` gives the run's progress
    (``finished``, ``epochs_done``). A kill between the two writes leaves the summary an epoch behind:
    the second value is then True, for the caller to say so. Runs older than records have only a summary.
    """
    if record is None:
        return summary, False  # type: ignore[return-value]
    stale = summary is None or any(summary.get(k) != record[k] for k in RECORD_KEYS if k in record)
    return {**(summary or record), **{k: record[k] for k in RECORD_KEYS if k in record}}, stale  # type: ignore[return-value]


def is_number(v: Any) -> bool:
    """A JSON number (``bool`` is an ``int`` to Python, never to a run file)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def scores_problem(m: Any, heads: int | None) -> str | None:
    """What is wrong with one evaluation of a history row (``val``/``test``): each head's and the
    ensemble's top-1/top-5, ``heads`` of them when given; None when it is sound."""
    ok = lambda d: isinstance(d, dict) and is_number(d.get("top1")) and is_number(d.get("top5"))  # noqa: E731
    if not isinstance(m, dict) or not isinstance(m.get("heads"), list) or not m["heads"] \
            or not all(map(ok, m["heads"])) or not ok(m.get("ensemble")):
        return "not each head's and the ensemble's top1 and top5"
    if heads is not None and len(m["heads"]) != heads:
        return f"{len(m['heads'])} heads where earlier epochs have {heads}"
    return None


def check_summary(s: Any, where: str, heads: int | None = None) -> RunSummary:
    """A run summary (``summary.json``, ``best/record.json``) with what collapse and the card read:
    ``best_epoch``, ``best_head`` inside ``heads``, one accuracy row per head (``heads`` of them
    when given). An edited or corrupt file would otherwise label weights with wrong numbers."""
    def bad(what: str) -> HeadsurgeonError:
        return HeadsurgeonError(f"'{where}' is invalid ({what}); was it edited? restore it or re-run training")

    if not isinstance(s, dict):
        raise bad("not a JSON object")
    missing = [k for k in ("best_epoch", "best_head", "heads") if k not in s]
    if missing:
        raise bad(f"no {', '.join(missing)}")
    rows = s["heads"]
    if not isinstance(rows, list) or not rows or not all(
            isinstance(h, dict) and all(isinstance(h.get(k), (int, float)) and not isinstance(h.get(k), bool)
                                        for k in ("val_top1", "test_top1")) for h in rows):
        raise bad("'heads' must list each head's val_top1 and test_top1")
    if heads is not None and len(rows) != heads:
        raise bad(f"{len(rows)} heads listed but the checkpoint has {heads}")
    b = s["best_head"]
    if not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < len(rows):
        raise bad(f"best_head {b!r} is not a head index 0..{len(rows) - 1}")
    if not isinstance(s["best_epoch"], int) or isinstance(s["best_epoch"], bool) or s["best_epoch"] < 1:
        raise bad(f"best_epoch {s['best_epoch']!r} is not an epoch number")
    for name, m in [*((f"head {i}", h) for i, h in enumerate(rows)), ("ensemble", s.get("ensemble") or {})]:
        for k, v in m.items() if isinstance(m, dict) else ():  # json reads NaN and Infinity: never a card's accuracy
            if k.endswith(("_top1", "_top5")) and not (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                          and 0 <= v <= 100):
                raise bad(f"{name} {k} is {v!r}, not a percentage 0..100")
    names = s.get("label_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        raise bad(f"label_names is {names!r:.60}, not a list of class names")  # a string would be one name per letter
    return s  # type: ignore[return-value]


def read_summary(path: Path, heads: int | None = None) -> RunSummary | None:
    """A summary file, parsed and checked in one line each; None if absent."""
    if not path.is_file():
        return None
    try:
        s = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeadsurgeonError(f"'{path}' is unreadable ({type(e).__name__}: {str(e)[:120]}); restore it or "
                               f"re-run training") from None
    return check_summary(s, str(path), heads)


def best_score(record: Mapping[str, Any]) -> float:
    """The validation top-1 of a summary's best head: how ``history/`` ranks its epochs."""
    return record["heads"][record["best_head"]]["val_top1"]


def read_metrics(path: Path, fix: str) -> list[EpochRow]:
    """Every line of a ``metrics.jsonl``; a line that is not a JSON object is refused (naming ``fix``),
    never skipped."""
    rows = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines() if path.exists() else [], 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise HeadsurgeonError(f"'{path}' line {n} is not a JSON object (a corrupt or edited file); {fix}")
        rows.append(row)
    return rows

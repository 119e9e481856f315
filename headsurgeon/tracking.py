"""Experiment tracking of a training run: ``summary.csv``, TensorBoard and Weights & Biases.

Once per epoch, after the epoch's row is in ``metrics.jsonl``, :meth:`Trackers.epoch` sends the same
numbers to every tracker (primary process only):

- ``summary.csv`` in the run directory, always, written by timm's own ``timm.utils.update_summary``
  (the file timm's ``train.py`` writes): ``epoch``, ``train_*``, ``eval_*`` (validation; timm's
  ``eval_top1``/``eval_top5`` are the head chosen by validation at that epoch), ``eval_test_*`` and ``lr``;
- TensorBoard event files in ``RUN/tensorboard/`` with ``log.tensorboard: true``
  (``torch.utils.tensorboard``; the optional extra ``headsurgeon[tensorboard]``);
- a Weights & Biases run with ``log.wandb: true`` (the optional extra ``headsurgeon[wandb]``), whose
  config is the recipe and whose files go to ``RUN/wandb/``; ``WANDB_MODE=offline`` keeps it on the machine.

What is logged per head and for the ensemble: validation and test top-1 and top-5, training top-1
(on the augmented, possibly noisy labels, as the loop measures it; the loop does not measure a
training top-5), the objective's hard and soft loss terms (and ONE/PCL's teacher term, cl's scheduled
``beta``), and per
run: the loss, the learning rate, training images per second and the head validation chooses.

A resumed run continues each tracker where its last checkpoint was: ``summary.csv`` rows and
TensorBoard events of later epochs are dropped (timm's ``trim_summary``, TensorBoard's
``purge_step``) and the W&B run is resumed by its id (kept in ``RUN/wandb/run-id``).
"""
from __future__ import annotations

import atexit
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import HeadsurgeonError, first_line
from .recipe import missing_extras

SUMMARY_CSV = "summary.csv"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"


def scalars(row: dict[str, Any], best: dict[str, Any] | None = None,
            images_per_s: float | None = None) -> dict[str, float]:
    """One epoch's row of ``metrics.jsonl`` as flat ``group/name`` scalars (the TensorBoard and W&B keys)."""
    out: dict[str, float] = {"train/loss": row["train_loss"], "train/lr": row["lr"]}
    heads = len(row["val"]["heads"])
    for i, top1 in enumerate(row.get("train_top1") or []):
        out[f"train/top1/head{i}"] = top1
    terms = row.get("loss_terms") or {}
    for kind in ("hard", "soft"):
        for i, v in enumerate(terms.get(kind) or []):
            out[f"loss/{kind}/head{i}"] = v
    if "teacher_ce" in terms:
        out["loss/teacher_ce"] = terms["teacher_ce"]
    if "beta" in row:  # cl's late-consensus schedule
        out["loss/beta"] = row["beta"]
    for split in ("val", "test"):
        m = row[split]
        for i, h in enumerate(m["heads"]):
            out[f"{split}/top1/head{i}"], out[f"{split}/top5/head{i}"] = h["top1"], h["top5"]
        out[f"{split}/top1/ensemble"], out[f"{split}/top5/ensemble"] = m["ensemble"]["top1"], m["ensemble"]["top5"]
    chosen = max(range(heads), key=lambda h: row["val"]["heads"][h]["top1"])
    out["chosen/head_this_epoch"] = chosen
    if best is not None:
        out["chosen/head"], out["chosen/epoch"], out["chosen/val_top1"] = best["head"], best["epoch"], best["val_top1"]
    if images_per_s is not None:
        out["train/images_per_s"] = images_per_s
    return out


def csv_columns(row: dict[str, Any], best: dict[str, Any] | None = None,
                images_per_s: float | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """``(train_metrics, eval_metrics)`` for ``timm.utils.update_summary``: timm prefixes them with
    ``train_`` and ``eval_``; ``eval_top1``/``eval_top5`` are the validation accuracies of the head
    chosen by validation at this epoch, as timm's single model has them."""
    s = scalars(row, best, images_per_s)
    chosen = int(s["chosen/head_this_epoch"])
    train: dict[str, float] = {"loss": row["train_loss"]}
    train.update({k.split("/", 1)[1].replace("/", "_"): v for k, v in s.items()
                  if k.startswith("train/") and k not in ("train/loss", "train/lr")})
    train.update({k.split("/", 1)[1].replace("/", "_"): v for k, v in s.items() if k.startswith("loss/")})
    ev: dict[str, float] = {"top1": s[f"val/top1/head{chosen}"], "top5": s[f"val/top5/head{chosen}"]}
    ev.update({k.split("/", 1)[1].replace("/", "_"): v for k, v in s.items() if k.startswith("val/")})
    ev.update({"test_" + k.split("/", 1)[1].replace("/", "_"): v for k, v in s.items() if k.startswith("test/")})
    ev["chosen_head"] = chosen
    if best is not None:
        ev["best_head"], ev["best_epoch"] = best["head"], best["epoch"]
    return train, ev


class Trackers:
    """Every tracker of one run; :meth:`epoch` once per finished epoch, :meth:`close` at the end.

    Built from plain values (the run's folder, its recipe, the epoch it starts at, the training images
    per epoch), not from the trainer's state, so tracking depends on nothing above the recipe."""

    def __init__(self, directory: str | Path, recipe: Any, start: int = 0, train_images: int | None = None,
                 log: Callable[[str], None] = print):
        self.dir = Path(directory)
        self.csv = self.dir / SUMMARY_CSV
        self.train_images = train_images
        self.tb = self.wandb = None
        cfg = recipe.log
        problems = missing_extras(cfg)
        if problems:
            raise HeadsurgeonError("; ".join(problems))
        from timm.utils import summary as timm_summary

        trim = getattr(timm_summary, "trim_summary", None)
        if trim is not None:  # a resumed run rewrites the epochs after its checkpoint
            trim(str(self.csv), start + 1)
        elif start == 0:
            self.csv.unlink(missing_ok=True)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / TENSORBOARD_DIR), purge_step=start + 1 if start else None)
            log(f"TensorBoard: tensorboard --logdir {self.dir / TENSORBOARD_DIR}")
        if cfg.wandb:
            self.wandb = _wandb_run(self.dir, recipe, start, log)
        atexit.register(self.close)  # a run stopped by an error still flushes what it logged

    def epoch(self, row: dict[str, Any], best: dict[str, Any] | None = None, train_s: float | None = None) -> None:
        """Log one epoch's row of ``metrics.jsonl``; ``best`` is the run's best so far (the head
        ``collapse`` would export), ``train_s`` the seconds the epoch's training took (images per second)."""
        from timm.utils import update_summary

        ips = round(self.train_images / train_s, 1) if self.train_images and train_s else None
        train, ev = csv_columns(row, best, ips)
        try:
            update_summary(row["epoch"], train, ev, str(self.csv), lr=row["lr"])
        except OSError as e:  # a full disk: one line; the last checkpoint is intact and the csv is rewritten on resume
            from .storage import os_error

            raise os_error(e, self.csv, f"the previous checkpoint is intact: free space, then continue with "
                                        f"`headsurgeon train --resume -o {self.dir}`") from None
        values = scalars(row, best, ips)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({"epoch": row["epoch"], **values}, step=row["epoch"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        atexit.unregister(self.close)


def _wandb_run(directory: Path, recipe: Any, start: int, log: Callable[[str], None]) -> Any:
    import wandb

    where = directory / WANDB_DIR
    where.mkdir(parents=True, exist_ok=True)
    id_file = where / "run-id"
    run_id = id_file.read_text().strip() if start and id_file.is_file() else uuid.uuid4().hex[:8]
    cfg = recipe.log
    try:
        run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=directory.name, id=run_id,
                         resume="allow", dir=str(directory), config=recipe.nested())
    except Exception as e:  # not logged in, unreachable, bad project: one line before any training
        raise HeadsurgeonError(f"log.wandb: wandb.init failed: {first_line(e)} (run `wandb login`, or set "
                               f"WANDB_MODE=offline to log on this machine only)") from None
    id_file.write_text(run_id + "\n")
    mode = getattr(run.settings, "mode", None) or "online"
    log(f"Weights & Biases run {run.name} ({mode}) in {where}")
    return run


def read_csv(path: str | Path) -> Iterator[dict[str, str]]:
    """The rows of a ``summary.csv`` (as timm's ``csv.DictWriter`` wrote them)."""
    import csv

    with open(path, newline="") as f:
        yield from csv.DictReader(f)

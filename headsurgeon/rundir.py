"""A training run's directory: every file a run writes or reads, in one place.

Layout::

    recipe.yaml      the resolved recipe (a resumed run must match it)
    metrics.jsonl    one line per epoch: per-head and ensemble top-1/top-5 on val and test, train_top1,
                     the objective's hard and soft loss terms per head
    summary.json     best epoch/head and its accuracies (rewritten each epoch; ``finished`` at the end)
    curves.png       per-head validation/test top-1 per epoch
    best/            tree directory (spec.json, tree.safetensors) of the best validation epoch, and
                     record.json: the summary as of that epoch, written in the same atomic step, so the
                     weights and the accuracies that describe them can never disagree
    last/            tree directory + state.pt (optimizer, scheduler, scaler, epoch, RNG, history) for
                     --resume, ema.safetensors with EMA, objective.safetensors for an objective's own
                     modules (ONE's gate)
    .lock            the PID (and start time) of the one process writing the run

What ``summary.json``, ``best/record.json`` and ``metrics.jsonl`` hold, and how they are checked and
merged, is :mod:`headsurgeon.summary`; ``curves.png`` is drawn by :mod:`headsurgeon.plots`.

Checkpoint directories are written atomically (a hidden sibling renamed into place; leftovers of a
killed write are removed on the next start); state is read with ``torch.load(weights_only=True)``
and weights with safetensors, so loading never unpickles arbitrary objects.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import yaml
from torch import nn

from . import plots, storage
from . import recipe as R
from .errors import HeadsurgeonError, first_line
from .summary import EpochRow, RunSummary, best_score, is_number, read_metrics, read_summary, scores_problem
from .spec import SPEC_FILE  # a checkpoint folder is a tree folder (spec.json)
from .tree import HeadTree

RUNS = Path("runs")
RECIPE_FILE, METRICS_FILE, SUMMARY_FILE, CURVES_FILE = "recipe.yaml", "metrics.jsonl", "summary.json", "curves.png"
BEST, LAST, RECOVERY, HISTORY = "best", "last", "recovery", "history"
STATE_FILE, EMA_FILE, OBJECTIVE_FILE, RECORD_FILE = "state.pt", "ema.safetensors", "objective.safetensors", "record.json"
LOCK_FILE = ".lock"
DATA_CONFIG_FILE = "data_config.json"  # the evaluation preprocessing the run was trained with, written once at its start


def latest_run(root: Path = RUNS, prefix: str = "", need: str = SUMMARY_FILE) -> Path | None:
    """Most recent run directory under ``root`` (by the mtime of ``need``)."""
    runs = [p for p in root.glob(f"{prefix}*") if (p / need).exists()] if root.is_dir() else []
    return max(runs, key=lambda p: (p / need).stat().st_mtime, default=None)


def new_run_path(name: str) -> Path:
    return RUNS / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def write_json(path: Path, obj: Any) -> None:
    storage.write_json(path, obj, sort_keys=False)  # a run's JSON keeps the order it was written in


STATE_KEYS = ("epoch", "optimizer", "scheduler", "history", "best", "wall_time_s")
RECOVERY_KEYS = ("step", "rng", "epoch_rng", "sums")


def _int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _state_problem(s: dict[str, Any]) -> str | None:
    """What is wrong with the values of a state file whose keys are all there (a hand-edited or corrupt
    file would otherwise fail deep inside the optimizer, the RNG or the summary, as a traceback)."""
    opt = s["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or not isinstance(
            opt.get("param_groups"), list) or not opt["param_groups"] or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt["param_groups"]):
        return "optimizer is not an optimizer's state (state and param_groups)"
    for key in ("scheduler", "scaler"):
        if s.get(key) is not None and not isinstance(s[key], dict):
            return f"{key} is {type(s[key]).__name__}, not a state dict"
    if not is_number(s["wall_time_s"]) or s["wall_time_s"] < 0:
        return f"wall_time_s {s['wall_time_s']!r}"
    if s["epoch"] < 0:
        return f"epoch {s['epoch']}"
    heads = None
    for i, row in enumerate(s["history"], 1):
        if not isinstance(row, dict) or row.get("epoch") != i:
            return f"history entry {i} is not the row of epoch {i}"
        for split_ in ("val", "test") if "val" in row or "test" in row else ():
            bad = scores_problem(row.get(split_), heads)
            if bad:
                return f"history epoch {i} {split_}: {bad}"
            heads = len(row[split_]["heads"])
    b = s["best"]
    if b is not None and not (isinstance(b, dict) and _int(b.get("epoch"), 1) and b["epoch"] <= s["epoch"]
                              and "val" in s["history"][b["epoch"] - 1] and _int(b.get("head"))
                              and b["head"] < (heads or 0) and is_number(b.get("val_top1"))):
        return f"best {b!r:.80} is not an evaluated epoch and head of its history"
    rngs = [s["rng"]] + ([s["epoch_rng"]] if "step" in s else [])
    if not all(isinstance(r, list) and r and all(isinstance(x, dict) and {"torch", "python", "numpy"} <= set(x)
                                                 for x in r) for r in rngs):
        return "rng is not a list of RNG states"
    if "step" in s:
        sums = s["sums"]
        if not _int(s["step"]) or not isinstance(sums, dict) or not _int(sums.get("seen")) or not all(
                isinstance(sums.get(k), torch.Tensor) for k in ("total", "hits", "terms")):
            return "step or sums of the mid-epoch point"
    return None


def _loads(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


@contextmanager
def _folder_mutex(path: Path):
    """An exclusive ``flock`` of the folder itself for a few file operations (no extra file is left);
    where ``fcntl`` is missing (Windows) the lock file alone guards the run."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class RunDir:
    """The files of one run. Only the primary process of a (DDP) run writes through it."""

    def __init__(self, path: str | os.PathLike):
        try:  # a name the file system refuses (ENAMETOOLONG) would fail the first stat of the run as a traceback
            R.check_path_name(str(path), f"run directory '{str(path)[:60]}...'" if len(str(path)) > 60 else
                              f"run directory '{path}'")
        except ValueError as e:
            raise HeadsurgeonError(str(e)) from None
        self.path = Path(path)
        self._locked = False
        self._restart = False
        self._resume: tuple[Path, dict[str, Any]] | None = None
        self._seen: list[tuple[str, int, int, int]] | None = None  # the folder as checked, before the lock
        self._fresh: str | None = None  # at the lock: "absent" or "empty" when this run is the folder's first

    def __str__(self) -> str:
        return str(self.path)

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def recovery(self) -> Path:
        return self.path / RECOVERY

    def resumable(self) -> bool:
        return (self.last / STATE_FILE).is_file() or (self.recovery / STATE_FILE).is_file()

    def resume_state(self) -> tuple[Path, dict[str, Any]]:
        """Where to resume and its checked state: ``recovery/`` when it is ahead of ``last/`` (a mid-epoch
        point of the epoch after it), else ``last/``. Read once per run: a state file holds the whole
        optimizer state, and the checks, the tree and the restore all need it."""
        if self._resume is None:
            if not (self.recovery / STATE_FILE).is_file():
                self._resume = (self.last, self.load_state(self.last))
            elif not (self.last / STATE_FILE).is_file():
                self._resume = (self.recovery, self.load_state(self.recovery))  # killed during the first epoch
            else:
                done, at = self.load_state(self.last), self.load_state(self.recovery)
                self._resume = (self.recovery, at) if at["epoch"] >= done["epoch"] else (self.last, done)
        return self._resume

    def check_new(self) -> bool:
        """A new run may write here. True when the folder holds a run killed before its first
        checkpoint (nothing to resume from): it is started over, its files replaced."""
        if self.restartable():
            storage.check_writable(self.path)
            self._restart = True
            self._seen = self._snapshot()
            return True
        self._not_a_tree()
        storage.check_output(self.path, fix="pass --resume to continue that run or choose another --output")
        self._seen = self._snapshot()
        return False

    def restartable(self) -> bool:
        """A run stopped before its first checkpoint: its recipe.yaml and no resume point, or (killed
        between taking the lock and writing recipe.yaml) nothing but a dead process's lock."""
        if self.resumable() or (self.path / SPEC_FILE).exists():
            return False
        return (self.path / RECIPE_FILE).is_file() or self._only_start_debris()

    def _only_start_debris(self) -> bool:
        """The folder holds only what a start writes before ``recipe.yaml`` and a process that is gone left:
        its lock (or the lock's temporary file), a half-written ``.recipe.yaml.tmp``, a writability probe."""
        try:
            names = [p.name for p in self.path.iterdir()]
        except OSError:
            return False
        debris = [n for n in names if n in (LOCK_FILE, f".{RECIPE_FILE}.tmp")
                  or n.startswith((f"{LOCK_FILE}.", ".headsurgeon-probe."))]
        return bool(names) and debris == names and self.owner() is None

    def _not_a_tree(self) -> None:
        if (self.path / SPEC_FILE).is_file():
            raise HeadsurgeonError(f"output '{self.path}' is a head tree directory, not a run; to train that tree give "
                                   f"it as the recipe's tree (--set tree={self.path}) and choose another --output")

    def check_resume(self) -> None:
        """Before any work: a resume point exists, its state file is sound, and the folder is writable."""
        if not self.resumable():
            self._not_a_tree()
            raise HeadsurgeonError(f"cannot resume '{self}': it has no {LAST}/{STATE_FILE} or {RECOVERY}/{STATE_FILE} "
                                   f"(no finished epoch or recovery point)"
                                   + ("; start it over without --resume" if self.restartable() else ""))
        self.resume_state()
        storage.check_writable(self.path)
        self._seen = self._snapshot()

    def _snapshot(self) -> list[tuple[str, int, int, int]]:
        """Name, inode, size and mtime of every entry of the folder and of its checkpoint folders: what
        :meth:`lock` compares with the folder as it was checked. Not the lock, nor the trackers' folders
        (W&B's background service may still be syncing into ``wandb/`` after its run ended)."""
        def listing(d: Path) -> list[Path]:
            try:
                return sorted(d.iterdir())
            except OSError:  # replaced while listed: a writer is at work
                return [d / "?"]

        out = []
        entries = [p for p in listing(self.path) if p.name not in (LOCK_FILE, "tensorboard", "wandb")] \
            if self.path.is_dir() else []
        for p in [*entries, *(q for d in entries if d.name in (BEST, LAST, RECOVERY, HISTORY) for q in listing(d))]:
            try:
                st = p.stat()
                out.append((str(p.relative_to(self.path)), st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:  # removed while listed
                out.append((str(p.relative_to(self.path)), -1, -1, -1))
        return out

    @contextmanager
    def _writing(self, what: str):
        """A failed write (a full or read-only disk, a file-size limit) names what was kept and how to go
        on; also one that a library reports as its own error (safetensors, torch.save)."""
        try:
            yield
        except HeadsurgeonError as e:
            raise HeadsurgeonError(f"{e}; {self._resume_hint(getattr(e, 'errno', None))}") from None
        except Exception as e:
            failed = storage.write_failure(e, self.path)
            if failed is None:
                raise
            raise storage.os_error(failed, self.path / what, self._resume_hint(failed.errno)) from None

    def _resume_hint(self, code: int | None = None) -> str:
        fix = storage.fix_for(OSError(code, "")) if code is not None else "free space"
        if not self.resumable():
            return f"there is no checkpoint yet: {fix}, then run the same command again (it starts the run over)"
        return f"the previous checkpoint is intact: {fix}, then continue with `headsurgeon train --resume -o {self.path}`"

    # -- one writer
    def owner(self) -> int | None:
        """The PID of a live process holding this run's lock, else None. The lock holds the PID and the
        process's start time: a lock whose PID a later process reuses is stale (a lock written before
        start times has only the PID)."""
        try:
            fields = (self.path / LOCK_FILE).read_text().split()
            pid, start = int(fields[0]), int(fields[1]) if len(fields) > 1 else None
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid > 0 and pid != os.getpid() and storage.process_alive(pid, start) else None

    def check_unlocked(self) -> None:
        pid = self.owner()
        if pid is not None:
            raise HeadsurgeonError(f"run directory '{self.path}' is in use by process {pid}; wait for it to finish "
                                   f"(or stop it) before writing to this run")

    def lock(self) -> None:
        """Take the run's lock file; a lock whose process is gone is stale and taken over.

        Two processes writing one run would mix its metrics, summary and weights, and a later
        ``collapse`` would label one run's weights with the other's accuracy. Checking the lock and
        writing it happen under an ``flock`` of the folder, so two starts cannot both take a stale or
        just-created lock; the PID is written whole (a file renamed into place), never read half-written.
        And the folder must still be as :meth:`check_new` / :meth:`check_resume` saw it: a run that
        finished or moved on between those checks and this lock is never overwritten or resumed from
        an older state.
        """
        self._fresh = "absent" if not self.path.exists() else \
            "empty" if not any(self.path.iterdir()) or self._only_start_debris() else None
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK_FILE
        with _folder_mutex(self.path):
            self.check_unlocked()  # a live process's lock; a dead one's is stale and replaced below
            tmp = self.path / f"{LOCK_FILE}.{os.getpid()}.tmp"
            try:
                start = storage.process_start(os.getpid())
                tmp.write_text(f"{os.getpid()}{'' if start is None else f' {start}'}\n")
                os.replace(tmp, lock)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise storage.os_error(e, lock) from None
            self._locked = True
        if self._seen is not None and self._snapshot() != self._seen:
            self.unlock()
            raise HeadsurgeonError(f"run directory '{self.path}' changed while this run was starting (another "
                                   f"`headsurgeon train` wrote to it); nothing was written: check it, then run the "
                                   f"command again")

    def unlock(self) -> None:
        if self._locked:
            self._locked = False
            try:
                (self.path / LOCK_FILE).unlink(missing_ok=True)
            except OSError:  # a file system gone read-only: the lock stays, stale once this process ends
                pass

    def discard_if_unstarted(self) -> bool:
        """Undo the start of a run that failed before it had anything to resume from (a refused W&B
        login, an out-of-memory first batch) in a folder that was absent or empty: a start that failed
        leaves nothing behind. A folder that held an earlier attempt keeps it (it is started over)."""
        if self._fresh is None or self._locked or self.resumable():
            return False
        if self._fresh == "absent":
            shutil.rmtree(self.path, ignore_errors=True)
            return True
        try:
            for p in self.path.iterdir():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        except OSError:  # a read-only file system: what is left is started over by the next run
            pass
        return True

    def restore_replaced(self) -> None:
        """Checkpoint folders a killed overwrite left as ``.NAME.old`` are put back before anything
        reads them (where the OS cannot swap folders in one step; see :func:`storage.atomic_dir`)."""
        for d in (self.best, self.last, self.recovery):
            storage.restore_replaced(d)

    def clean_partial(self) -> None:
        """Remove what a killed write left: hidden temporary checkpoint and JSON siblings, and, for a
        run started over (see :meth:`check_new`), the files of the attempt that was killed."""
        if self._restart:
            for name in (METRICS_FILE, SUMMARY_FILE, CURVES_FILE):
                (self.path / name).unlink(missing_ok=True)
            shutil.rmtree(self.best, ignore_errors=True)
        for p in self.path.glob(".*"):
            if p.name.startswith((f".{BEST}.", f".{LAST}.", f".{RECOVERY}.")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.name.endswith(".tmp") or p.name.endswith(".tmp.png"):
                p.unlink(missing_ok=True)

    # -- recipe
    def write_recipe(self, recipe: R.Recipe) -> None:
        with self._writing(RECIPE_FILE):  # atomic: a full disk leaves the resumed run's recipe as it was
            storage.write_text(self.path / RECIPE_FILE, yaml.safe_dump(recipe.nested(), sort_keys=False))

    def read_recipe(self) -> R.Recipe:
        """The stored recipe; keys added since the run started take their defaults."""
        where = str(self.path / RECIPE_FILE)
        return R.from_flat(R.read(self.path / RECIPE_FILE, where), where)

    # -- preprocessing
    def record_data_config(self, recipe: R.Recipe, spec: Any) -> None:
        """``data_config.json``: the evaluation preprocessing (timm ``pretrained_cfg`` keys: input size,
        interpolation, mean, std, crop) the run is trained and evaluated with, written when a run starts and
        never changed by a resume (which refuses a recipe that would change it). ``collapse`` exports it, so an
        edited or removed ``recipe.yaml`` cannot change what the exported model is fed."""
        from .data import eval_config

        path = self.path / DATA_CONFIG_FILE
        if self._resume is not None and path.is_file():
            return
        cfg = eval_config(recipe.data, spec.pretrained_cfg, spec.model_args.get("in_chans", 3))
        with self._writing(DATA_CONFIG_FILE):
            write_json(path, {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()})

    def data_config(self) -> dict[str, Any] | None:
        """The preprocessing recorded by :meth:`record_data_config`, checked; None for a run older than it."""
        path = self.path / DATA_CONFIG_FILE
        if not path.is_file():
            return None
        try:
            cfg = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HeadsurgeonError(f"'{path}' is unreadable ({type(e).__name__}); restore it or re-run training") from None
        size, mean, std = (cfg.get(k) if isinstance(cfg, dict) else None for k in ("input_size", "mean", "std"))
        nums = lambda v, n=None: isinstance(v, list) and v and (n is None or len(v) == n) and all(  # noqa: E731
            isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v)
        if not (nums(size, 3) and all(isinstance(x, int) for x in size) and nums(std, size[0])
                and isinstance(mean, list) and len(mean) == size[0] and isinstance(cfg.get("crop_pct"), (int, float))
                and isinstance(cfg.get("interpolation"), str)):
            raise HeadsurgeonError(f"'{path}' is invalid (input_size, mean, std, crop_pct and interpolation of the "
                                   f"run's preprocessing); was it edited? restore it or re-run training")
        return {**cfg, **{k: tuple(cfg[k]) for k in ("input_size", "mean", "std")}}

    # -- metrics
    def append_metrics(self, row: dict[str, Any]) -> None:
        with self._writing(METRICS_FILE), open(self.path / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")  # a half-written line is replaced on --resume (rewrite_metrics)

    def metrics(self) -> list[EpochRow]:
        """Every epoch's row; a line that is not a JSON object is refused, never skipped."""
        return read_metrics(self.path / METRICS_FILE, f"`headsurgeon train --resume -o {self.path}` rewrites it "
                                                      f"from the checkpoint")

    def rewrite_metrics(self, history: list[dict[str, Any]]) -> list[int]:
        """Make ``metrics.jsonl`` the checkpoint's history (epochs after it are trained again).

        Returns the line numbers that differed from it (corrupt, edited, or half-written by a kill
        or a full disk), for the caller to report: they are replaced, never kept silently.
        """
        p = self.path / METRICS_FILE
        lines = p.read_text(errors="replace").splitlines() if p.exists() else []
        want = [json.dumps(row) for row in history]
        bad = [n for n, (old, new) in enumerate(zip(lines, want), 1) if old != new and _loads(old) != _loads(new)]
        bad += list(range(len(lines) + 1, len(want) + 1))  # missing lines
        with self._writing(METRICS_FILE):
            storage.write_text(p, "".join(line + "\n" for line in want))
        return bad

    # -- checkpoints
    def save_best(self, tree: HeadTree, record: dict[str, Any]) -> None:
        with self._writing(BEST):
            tree.save(self.best, overwrite=True, extra=lambda tmp: write_json(tmp / RECORD_FILE, record))

    def save_last(self, tree: HeadTree, state: dict[str, Any], ema: nn.Module | None = None,
                  objective: nn.Module | None = None, where: str = LAST) -> None:
        """A resumable checkpoint: ``last/`` after an epoch, ``recovery/`` within one."""
        def extra(tmp: Path) -> None:
            torch.save(state, tmp / STATE_FILE)
            if ema is not None:
                safetensors.torch.save_model(ema, str(tmp / EMA_FILE))
            if objective is not None:
                safetensors.torch.save_model(objective, str(tmp / OBJECTIVE_FILE))

        with self._writing(where):
            tree.save(self.path / where, overwrite=True, extra=extra)

    def save_history(self, tree: HeadTree, record: dict[str, Any], keep: int) -> None:
        """``history/epoch-NNN/`` (tree + record.json) for the ``keep`` best epochs so far, by the
        validation top-1 of each epoch's best head (timm's ``--checkpoint-hist``); worse ones are removed."""
        hist = self.path / HISTORY
        score = best_score
        kept = []
        for d in sorted(hist.glob("epoch-*")) if hist.is_dir() else []:
            try:
                kept.append((score(json.loads((d / RECORD_FILE).read_text())), -int(d.name[6:]), d))
            except (OSError, ValueError, KeyError, IndexError):
                shutil.rmtree(d, ignore_errors=True)  # half-written by a kill: not a checkpoint
        mine = (score(record), -record["best_epoch"], hist / f"epoch-{record['best_epoch']:03d}")
        ranked = sorted([*kept, mine], reverse=True)  # best first; on a tie the earlier epoch
        if mine in ranked[:keep]:
            with self._writing(f"{HISTORY}/{mine[2].name}"):
                tree.save(mine[2], overwrite=True, extra=lambda tmp: write_json(tmp / RECORD_FILE, record))
        for _, _, d in ranked[keep:]:
            shutil.rmtree(d, ignore_errors=True)

    def drop_recovery(self) -> None:
        """After an epoch's ``last/`` is written its mid-epoch point is obsolete."""
        shutil.rmtree(self.recovery, ignore_errors=True)

    def load_state(self, point: Path) -> dict[str, Any]:
        """``<point>/state.pt``, checked: an empty, truncated, random or incomplete file is one line."""
        path = point / STATE_FILE
        fix = (f"delete {point} to resume from the previous checkpoint, or start a new run" if point.name == RECOVERY
               else "start a new run (or restore the file from a backup)")
        try:
            s = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # EOFError, RuntimeError (zip), UnpicklingError, ...: all mean "not a state file"
            msg = first_line(e, 120)
            raise HeadsurgeonError(f"cannot resume '{self.path}': {point.name}/{STATE_FILE} is unreadable "
                                   f"({type(e).__name__}{'' if msg == type(e).__name__ else ': ' + msg}); {fix}") from None
        need = STATE_KEYS + (RECOVERY_KEYS if isinstance(s, dict) and "step" in s else ("rng",))
        missing = [k for k in need if not isinstance(s, dict) or k not in s]
        if missing:
            raise HeadsurgeonError(f"cannot resume '{self.path}': {point.name}/{STATE_FILE} is incomplete "
                                   f"(no {', '.join(missing)}); {fix}")
        if not isinstance(s["epoch"], int) or not isinstance(s["history"], list) or len(s["history"]) != s["epoch"]:
            raise HeadsurgeonError(f"cannot resume '{self.path}': {point.name}/{STATE_FILE} is inconsistent "
                                   f"(epoch {s['epoch']!r} but {len(s['history']) if isinstance(s['history'], list) else '?'} "
                                   f"epochs of history); {fix}")
        problem = _state_problem(s)
        if problem:
            raise HeadsurgeonError(f"cannot resume '{self.path}': {point.name}/{STATE_FILE} is invalid ({problem}); "
                                   f"was it edited? {fix}")
        return s

    def load_into(self, module: nn.Module, point: Path, name: str, device: str | torch.device) -> None:
        """Weights of ``<point>/<name>`` (EMA, objective modules) into ``module``."""
        path = point / name
        if not path.is_file():
            raise HeadsurgeonError(f"cannot resume '{self.path}': {point.name}/{name} is missing")
        safetensors.torch.load_model(module, str(path), device=str(device))

    # -- summary and plot
    def write_summary(self, summary: RunSummary) -> None:
        with self._writing(SUMMARY_FILE):
            write_json(self.path / SUMMARY_FILE, summary)

    def summary(self, heads: int | None = None) -> RunSummary | None:
        """``summary.json``, checked (see :func:`headsurgeon.summary.check_summary`); None if absent."""
        return read_summary(self.path / SUMMARY_FILE, heads)

    def best_record(self, heads: int | None = None) -> RunSummary | None:
        """The summary as of the epoch whose weights ``best/`` holds (None for runs older than records)."""
        return read_summary(self.best / RECORD_FILE, heads)

    def plot(self, history: list[dict[str, Any]]) -> bool:
        """``curves.png``: each head's and the ensemble's val/test top-1 per epoch. False without matplotlib."""
        plt = plots.pyplot()
        if plt is None:
            return False
        fig = plots.curves(plt, history)
        tmp = self.path / ".curves.tmp.png"
        try:
            with self._writing(CURVES_FILE):
                fig.savefig(tmp, dpi=100)
                os.replace(tmp, self.path / CURVES_FILE)
        finally:
            plt.close(fig)
            tmp.unlink(missing_ok=True)
        return True

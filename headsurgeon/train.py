"""The training loop: a head tree on timm's training stack, one process or DDP under torchrun.

``train`` builds everything a run needs (:func:`build`), restores a checkpoint when resuming
(:func:`restore`), then runs epochs (:func:`train_epoch`, :func:`evaluate`). Every file of the
run goes through :class:`~headsurgeon.rundir.RunDir`, whose docstring lists the layout; what the
result files hold is :mod:`headsurgeon.summary`. The RNG state a bit-identical resume needs is taken
here (:func:`rng_state`): it is the loop's state, which ``rundir`` only stores.
"""
from __future__ import annotations

import contextlib
import gc
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from . import data as D
from . import objectives as O
from . import parallel as P
from . import recipe as R
from . import tracking
from .errors import HeadsurgeonError, first_line
from .rundir import EMA_FILE, OBJECTIVE_FILE, RUNS, STATE_FILE, RunDir, latest_run, new_run_path
from .summary import RunSummary
from .surgery import split
from .task import CollaborativeTask, evaluate, evaluate_fit, temporal_mean
from .trace import allow_leaf_modules
from .tree import HeadTree

__all__ = ["train", "evaluate", "evaluate_fit", "train_epoch", "objective_for", "mixup_for", "tree_for", "temporal_mean", "build",
           "restore", "RUNS", "STATE_FILE", "latest_run"]


def objective_for(recipe: R.Recipe) -> O.Objective:
    """The recipe's ``loss.*`` keys as the registered objective ``loss.objective``: every parameter (a
    dataclass field of the objective) that has a ``loss.<name>`` key takes it; the others keep their
    defaults, and ``temperature: null`` keeps the objective's own."""
    from dataclasses import fields

    loss, d = recipe.loss, recipe.data
    mixing = d.mixup > 0 or d.cutmix > 0 or d.cutmix_minmax is not None  # Mixup smooths the targets itself
    keys = loss.model_dump()
    keys["label_smoothing"] = 0.0 if mixing else loss.label_smoothing
    if keys.get("beta_end") is not None and not keys.get("beta_epochs"):
        keys["beta_epochs"] = recipe.epochs  # the schedule ends at the run's last epoch
    params = {f.name: keys[f.name] for f in fields(O.OBJECTIVES[loss.objective])
              if f.name in keys and keys[f.name] is not None}
    return O.get(loss.objective, **params)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from (data order, augmentation, dropout), for a bit-identical resume."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ------------------------------------------------------------------------------- building a run

@dataclass
class Process:
    device: torch.device
    rank: int = 0
    world: int = 1
    distributed: bool = False

    @property
    def primary(self) -> bool:
        return self.rank == 0


@dataclass
class Run:
    """Everything one process trains with."""
    recipe: R.Recipe
    proc: Process
    layout: P.Layout  # how the tree lies over the ranks (recipe parallel)
    dir: RunDir
    splits: D.Splits
    task: CollaborativeTask  # the tree, its objective, the objective's modules and temporal mean
    optimizer: Any
    scheduler: Any
    scaler: Any
    autocast: Callable
    train_loader: Any
    eval_loaders: dict[str, Any]
    log: Callable[[str], None]
    mixup: Any = None  # timm.data.Mixup, or None
    fit_eval: tuple[Any, dict[int, int]] | None = None  # recipe log.fit_every: un-augmented train loader, its offsets
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    recovery: dict[str, Any] | None = None  # a mid-epoch resume point: where and with which RNG to continue
    start: int = 0
    wall_before: float = 0.0
    t_start: float = 0.0

    @property
    def tree(self) -> HeadTree:
        return self.task.tree

    @property
    def objective(self) -> O.Objective:
        return self.task.objective

    @property
    def ema(self) -> Any:  # the temporal mean (recipe ema, or pcl's), or None
        return self.task.ema

    @property
    def modules(self) -> torch.nn.Module | None:  # ONE's gate, PCL's peer ensemble (unwrapped), or None
        m = self.task.objective_modules
        return getattr(m, "module", m)


def _process(device: str = "auto") -> Process:
    from timm.utils.distributed import init_distributed_device_so

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise HeadsurgeonError("device 'cuda' was asked for but torch sees no CUDA GPU; use device: auto or cpu")
    elif device == "mps" and not mps:
        raise HeadsurgeonError("device 'mps' was asked for but torch has no MPS backend here; use device: auto or cpu")
    dev = init_distributed_device_so(device)
    return Process(torch.device(dev["device"]), dev["global_rank"], dev["world_size"], dev["distributed"])


def mixup_for(recipe: R.Recipe, classes: int):
    """timm's ``Mixup`` when mixup or cutmix is on: it folds ``loss.label_smoothing`` into the soft
    targets (and the objective's own smoothing is then 0), as timm's train.py does."""
    d = recipe.data
    if not (d.mixup > 0 or d.cutmix > 0 or d.cutmix_minmax is not None):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, cutmix_minmax=d.cutmix_minmax, prob=d.mixup_prob,
                 switch_prob=d.mixup_switch_prob, mode=d.mixup_mode, label_smoothing=recipe.loss.label_smoothing,
                 num_classes=classes)


def _run_dir(recipe: R.Recipe, name: str, output: str | None, resume: bool, proc: Process,
             log: Callable[[str], None]) -> RunDir:
    out = output or recipe.output
    if out is None and resume:
        found = (latest_run(RUNS, f"{name}-", need=f"last/{STATE_FILE}")
                 or latest_run(RUNS, f"{name}-", need=f"recovery/{STATE_FILE}"))
        if found is None:
            raise HeadsurgeonError(f"--resume found no run of '{name}' under {RUNS}/; pass --output RUN_DIR")
        out = str(found)
        log(f"resuming {out}")
    if out is None:
        out = str(new_run_path(name))
        if proc.distributed:  # one name for all ranks (their clocks can straddle a second)
            box = [out]
            torch.distributed.broadcast_object_list(box, src=0)
            out = box[0]
    run = RunDir(out)
    run.check_unlocked()
    run.restore_replaced()
    if resume:
        run.check_resume()  # a resume point whose state file is sound, in a writable folder
        try:
            old = run.read_recipe()
        except HeadsurgeonError as e:
            raise HeadsurgeonError(f"cannot resume '{run}': its recipe.yaml is unreadable ({e})") from None
        changed = [c for c in R.diff(old, recipe) if not (c.startswith("epochs:") and recipe.epochs > old.epochs)]
        if changed:
            raise HeadsurgeonError(f"refusing to resume '{run}' with a changed recipe: {'; '.join(changed)} "
                                   f"(start a new run, or undo the change)")
    elif run.check_new():
        log(f"'{run}' holds a run stopped before its first checkpoint (nothing to resume); starting it over")
    return run


def check(recipe: R.Recipe) -> HeadTree:
    """The recipe's tree built without its data (random init unless the recipe names weights), so that
    an unknown model, split point, fan-out or leaf module is refused in seconds, before a long job.
    The classifier size does not change what is checked: 10 classes stand in for the dataset's."""
    with allow_leaf_modules(recipe.split.leaf_modules):
        tree = HeadTree.load(recipe.tree) if recipe.tree else tree_for(recipe, classes=10)
    P.check(recipe.parallel, recipe, tree, objective_for(recipe))
    return tree


def tree_for(recipe: R.Recipe, classes: int) -> HeadTree:
    """The recipe's tree: ``tree:`` loaded (its classes checked), else ``model`` split as ``split.*`` says."""
    r = recipe
    if r.tree:
        with allow_leaf_modules(r.split.leaf_modules):
            tree = HeadTree.load(r.tree)
        have = tree.spec.model_args.get("num_classes", tree.spec.pretrained_cfg.get("num_classes"))
        if have != classes:
            raise HeadsurgeonError(f"tree '{r.tree}' has {have} classes but dataset '{r.data.dataset}' has "
                                   f"{classes}; re-split with --num-classes {classes}")
        return tree
    per = r.model_kwargs if isinstance(r.model_kwargs, list) else None  # one mapping per peer
    kwargs = dict(r.model_kwargs if per is None else {}, num_classes=classes)
    if r.pretrained:
        kwargs["pretrained"] = True
    size = r.data.img_size
    return split(r.model, at=r.split.at, heads=r.split.heads, fanout=r.split.fanout, rescale=r.split.rescale,
                 branch_init=r.split.branch_init, weights=r.weights, seed=r.seed, peer_kwargs=per,
                 leaf_modules=r.split.leaf_modules,
                 input_size=({**kwargs, **(per or [{}])[0]}.get("in_chans", 3), size, size), **kwargs)


def build(recipe: R.Recipe, name: str = "run", output: str | None = None, resume: bool = False,
          log: Callable[[str], None] = print) -> Run:
    """Process group, run directory (locked), data, tree, objective, optimizer, schedule, AMP, EMA, DDP."""
    from timm.utils import random_seed

    r = recipe
    proc = _process(r.device)
    log = log if proc.primary else (lambda message: None)
    layout = P.layout_for(r.parallel, proc, r.amp)
    run_dir = _run_dir(r, name, output, resume, proc, log)
    shards = layout.shards  # instances: every rank the same batches, as one process
    rank, world = (proc.rank, proc.world) if shards else (0, 1)
    random_seed(r.seed, rank)
    splits = D.splits(r.data)
    with allow_leaf_modules(r.split.leaf_modules):  # the recipe names the classes its tree may import
        tree = HeadTree.load(run_dir.resume_state()[0]) if resume else tree_for(r, splits.num_classes)
    autocast, scaler = _amp(r, proc, log)
    task, data_cfg = _task(r, layout, tree)
    optimizer = _optimizer(r, task)
    train_loader = D.loader(splits.train, r.data, data_cfg, True, proc.device, shards)
    evals = {k: D.loader(D.shard(getattr(splits, k), rank, world), r.data, data_cfg, False, proc.device)
             for k in ("val", "test")}
    if proc.primary:
        _warn_slow_mean(task.ema, r.epochs * _updates(len(train_loader), r), "loss.ema_decay" if r.loss.objective == "pcl"
                        else "ema", log)
    scheduler = _scheduler(r, optimizer, len(train_loader))
    if proc.primary:  # only after everything that can refuse the input (a batch larger than the data, an optimizer
        run_dir.lock()  # timm cannot make): a bad recipe writes nothing and leaves no lock; train() unlocks
        run_dir.clean_partial()
    fit_eval = None
    if r.log.fit_every:  # the training images with their true labels; the flips are applied when counting
        own = D.shard(splits.train, rank, world)
        fit_eval = (D.loader(D.View(own.base, own.indices, None, splits.num_classes), r.data, data_cfg, False,
                             proc.device), own.offsets)
    return Run(r, proc, layout, run_dir, splits, task, optimizer, scheduler, scaler, autocast, train_loader, evals, log,
               mixup_for(r, splits.num_classes), fit_eval=fit_eval)


def _amp(r: R.Recipe, proc: Process, log: Callable[[str], None]) -> tuple[Callable, Any]:
    """The autocast context of the forward pass (``amp``: CUDA only) and fp16's gradient scaler (else None)."""
    from timm.utils import NativeScaler

    cuda = proc.device.type == "cuda"
    if r.amp and not cuda:
        log("amp is for CUDA; training in fp32 on CPU")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(r.amp) if cuda else None
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    return autocast, NativeScaler() if amp_dtype == torch.float16 else None


def _task(r: R.Recipe, layout: P.Layout, tree: HeadTree) -> tuple[CollaborativeTask, dict[str, Any]]:
    """The tree (sync BN, gradient checkpointing, channels-last as the recipe says) inside the task with
    the recipe's objective and EMA, laid over the ranks as ``parallel`` says, and the run's preprocessing."""
    proc = layout.proc
    objective = objective_for(r)
    P.check(r.parallel, r, tree, objective)
    if layout.shards and r.sync_bn and proc.device.type == "cuda":
        from timm.layers import convert_sync_batchnorm
        tree = convert_sync_batchnorm(tree)
    layout.place(tree)
    tree.set_grad_checkpointing(r.grad_checkpointing)
    if r.channels_last:
        tree.to(memory_format=torch.channels_last)
    spec = tree.spec
    data_cfg = D.data_config(r.data, spec.pretrained_cfg, spec.model_args.get("in_chans", 3))
    task = CollaborativeTask(tree, objective, ema=r.ema, input_size=data_cfg["input_size"])
    if r.compile:
        task.compile(backend=r.compile if isinstance(r.compile, str) else "inductor")
    layout.wrap(task)
    return task, data_cfg


def _optimizer(r: R.Recipe, task: CollaborativeTask) -> Any:
    """timm's optimizer of the recipe's ``optim.*`` over the task; one line for what timm cannot make.

    Weight decay skips biases, norms and the model's own no_weight_decay() names (the task maps them);
    the objective's gate or ensemble is decayed like the heads (and its biases not, by timm's rule)."""
    from timm.optim import create_optimizer_v2

    extra_opt = {k: v for k, v in (("eps", r.optim.opt_eps), ("betas", r.optim.opt_betas)) if v is not None}
    if "betas" in extra_opt:
        extra_opt["betas"] = tuple(extra_opt["betas"])
    try:
        return create_optimizer_v2(task, opt=r.optim.opt, lr=r.optim.lr, weight_decay=r.optim.weight_decay,
                                   momentum=r.optim.momentum, layer_decay=r.optim.layer_decay, **extra_opt)
    except (ValueError, TypeError, AssertionError, IndexError, KeyError) as e:  # optim.opt_betas=[0.9]: IndexError
        raise HeadsurgeonError(f"optimizer '{r.optim.opt}' cannot be created: {first_line(e)} (check the optim.* keys, "
                               f"e.g. opt_betas: adam-like optimizers take 2; timm.optim.list_optimizers() names "
                               f"the optimizers)") from None


def _scheduler(r: R.Recipe, optimizer: Any, batches: int) -> Any:
    """timm's schedule of the recipe's ``sched.*`` (None for ``sched: none``), stepped per update or epoch."""
    from timm.scheduler import create_scheduler_v2

    if r.sched.sched == "none":
        return None
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=r.sched.sched, num_epochs=r.epochs, warmup_epochs=r.sched.warmup_epochs,
        warmup_lr=r.sched.warmup_lr, min_lr=r.sched.min_lr, decay_epochs=r.sched.decay_epochs,
        decay_milestones=r.sched.decay_milestones, decay_rate=r.sched.decay_rate,
        step_on_epochs=r.sched.step_on_epochs, updates_per_epoch=_updates(batches, r))
    return scheduler


def _warn_slow_mean(ema: Any, steps: int, key: str, log: Callable[[str], None]) -> None:
    """Say so when an EMA that is evaluated and exported averages over much of the run: it then lags the
    trained weights. On the Fashion-MNIST study (about 2,700 steps) PCL's temporal mean at the default
    0.999 (about 1,000 steps) was worse than at 0.99 by more than 1 pp (docs/paper.md)."""
    if ema is None or steps < 1 or ema.decay <= 0:
        return
    window = 1 / (1 - ema.decay)
    if window > 0.1 * steps:
        fit = 1 - 1 / (0.04 * steps)  # a window of 4 % of the steps
        log(f"note: {key} {ema.decay:g} averages the weights over about {window:,.0f} optimizer steps, "
            f"{window / steps:.0%} of this run's {steps:,}: the evaluated and exported mean will lag the trained "
            f"weights; " + (f"about {fit:.3g} (a window of 4 % of the steps) fits this budget" if fit >= 0.5 else
                            "a much smaller decay, or more steps, fits this budget"))


def _updates(batches: int, recipe: R.Recipe) -> int:
    """Optimizer steps per epoch: one per ``grad_accum_steps`` micro-batches, the last group possibly short."""
    return -(-batches // recipe.optim.grad_accum_steps)


def _rng_rank(run: Run) -> int:
    """Whose saved RNG this rank continues with: its own; under ``instances`` every rank draws as one
    process does, so rank 0's (a one-process run may then resume as instances, and back)."""
    return run.proc.rank if run.layout.data_parallel else 0


def restore(run: Run) -> None:
    """Continue from ``last/``: optimizer, schedule, scaler, EMA, the objective's modules, RNG, history."""
    point, s = run.dir.resume_state()
    run.layout.load_optimizer_state(run.optimizer, s["optimizer"])
    extended = s.get("epochs", run.recipe.epochs) != run.recipe.epochs
    if run.scheduler is not None and not extended:
        run.scheduler.load_state_dict(s["scheduler"])
    elif run.scheduler is not None:  # a longer run: the new schedule, at the point where the old one stopped
        if run.recipe.sched.step_on_epochs:
            run.scheduler.step(s["epoch"])
        else:
            run.scheduler.step_update(s["epoch"] * _updates(len(run.train_loader), run.recipe))
    if run.scaler is not None and s.get("scaler"):
        run.scaler.load_state_dict(s["scaler"])
    if run.ema is not None:
        run.dir.load_into(run.ema.module, point, EMA_FILE, run.proc.device)
    if run.modules is not None:
        run.dir.load_into(run.modules, point, OBJECTIVE_FILE, run.proc.device)
    run.start, run.history, run.best, run.wall_before = s["epoch"], s["history"], s["best"], s["wall_time_s"]
    if "step" in s:  # mid-epoch: train_epoch replays the epoch's data order up to the step, then continues
        run.recovery = s
    else:
        set_rng_state(s["rng"][_rng_rank(run)])
    if run.proc.primary:  # metrics.jsonl = the checkpoint's history; a corrupt or extra line is reported, not kept
        bad = run.dir.rewrite_metrics(run.history)
        if bad:
            run.log(f"metrics.jsonl: line(s) {', '.join(map(str, bad))} did not match the checkpoint "
                    f"(corrupt, edited or half-written); rewritten from {point.name}/{STATE_FILE}")


# ------------------------------------------------------------------------------- the loop

def train_epoch(run: Run, epoch: int) -> tuple[float, list[float], dict[str, Any]]:
    """One epoch. Returns the mean loss, each head's top-1 on the (augmented, possibly noisy) training
    labels as it went, and the objective's per-head hard/soft terms averaged over the epoch.

    With ``optim.grad_accum_steps`` k, the optimizer steps once per k micro-batches (each loss
    scaled by its share of the group; DDP syncs gradients only on the group's last micro-batch),
    and the scheduler, EMA and clipping run per optimizer step, as in timm's train.py.
    """
    from tqdm import tqdm

    r, dev, loader = run.recipe, run.proc.device, run.train_loader
    steps, accum = len(loader), r.optim.grad_accum_steps
    updates = _updates(steps, r)
    rec, run.recovery = run.recovery, None
    sums = _Sums.begin(run.tree.num_heads, dev, rec)
    if rec is not None:  # the RNG of the epoch's start: the same data order and augmentation draws
        set_rng_state(rec["epoch_rng"][_rng_rank(run)])
    epoch_rng = _gather(run, rng_state())
    task = run.task
    task.train()  # PCL's temporal mean too: it runs on each batch in train mode, as the re-implementation does
    task.set_epoch(epoch)
    mixup = run.mixup if run.mixup is not None and (not r.data.mixup_off_epoch or epoch < r.data.mixup_off_epoch) \
        else None
    bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{r.epochs}", leave=False,
               disable=None if run.proc.primary else True, dynamic_ncols=True)
    params = [p for p in task.parameters() if p.requires_grad]
    for step, (x, y) in enumerate(bar):
        if rec is not None and step < rec["step"]:  # trained before the kill: replay the batch, skip the step
            if step == rec["step"] - 1:
                set_rng_state(rec["rng"][_rng_rank(run)])  # the RNG as it was after that step
            continue
        update, first = step // accum, step % accum == 0
        group = min(accum, steps - update * accum)  # micro-batches in this optimizer step
        last = step % accum == group - 1
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        target = y
        if mixup is not None:
            x, target = mixup(x, y)
        if r.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = _step(run, x, target, params, first, last, group, f"epoch {epoch + 1} step {step + 1}")
        if last:
            task.after_step(step=epoch * updates + update)
            if run.scheduler is not None:
                run.scheduler.step_update(epoch * updates + update + 1)
        sums.add(out, y)
        if last and r.recovery_interval and (update + 1) % r.recovery_interval == 0 and step < steps - 1:
            _recovery_point(run, epoch, step + 1, epoch_rng, sums.state())
        if run.proc.primary and (step % 10 == 0 or step == steps - 1) and not bar.disable:
            acc = " ".join(f"{a:.0f}" for a in (sums.hits * 100 / sums.seen).tolist())
            bar.set_postfix_str(f"loss {sums.total.item() / sums.seen:.3f} acc/head {acc}")
    bar.close()
    return sums.result(run)


def _step(run: Run, x: torch.Tensor, target: torch.Tensor, params: list[torch.nn.Parameter], first: bool,
          last: bool, group: int, where: str) -> Any:
    """One micro-batch: forward, the loss checked finite, backward scaled by its share of the group of
    ``group``; on the group's ``last`` micro-batch clipping and the optimizer step (else DDP does not sync).
    Returns the task's :class:`~headsurgeon.objectives.LossOut`."""
    from timm.utils import dispatch_clip_grad

    r, task, clip = run.recipe, run.task, run.recipe.optim.clip_grad
    sync = contextlib.nullcontext() if last or not run.proc.distributed else task.no_sync()
    with sync:
        with run.autocast():
            out = task(x, target)
        loss = out.loss
        if not torch.isfinite(loss).item():
            raise HeadsurgeonError(f"loss is {loss.item()} at {where}; stopped, keeping "
                                   f"the last good checkpoint in {run.dir.last} (lower optim.lr, or turn amp off)")
        if first:
            run.optimizer.zero_grad(set_to_none=True)
        scaled = loss / group if group > 1 else loss
        if run.scaler is not None:
            run.scaler(scaled, run.optimizer, clip_grad=clip, clip_mode=r.optim.clip_mode, parameters=params,
                       need_update=last)
        else:
            scaled.backward()
            if last:
                if clip:
                    dispatch_clip_grad(params, clip, mode=r.optim.clip_mode)
                run.optimizer.step()
    return out


@dataclass
class _Sums:
    """An epoch's running sums on the device: loss, each head's hits, the objective's terms (hard, soft,
    extra: the teacher CE in slot 0) and the samples seen; a mid-epoch point saves them (``sums``)."""
    total: torch.Tensor
    hits: torch.Tensor
    terms: torch.Tensor
    seen: int = 0
    has_teacher: bool = False

    @classmethod
    def begin(cls, heads: int, dev: torch.device, rec: dict[str, Any] | None) -> "_Sums":
        """Zero, or where a mid-epoch point ``rec`` left them."""
        if rec is None:
            return cls(torch.zeros((), device=dev), torch.zeros(heads, device=dev), torch.zeros(3, heads, device=dev))
        total, hits, terms = (rec["sums"][k].to(dev) for k in ("total", "hits", "terms"))
        return cls(total, hits, terms, rec["sums"]["seen"])

    def add(self, out: Any, y: torch.Tensor) -> None:
        with torch.no_grad():
            self.total += out.loss.detach() * len(y)
            self.hits += torch.stack([(o.argmax(1) == y).sum() for o in out.logits]).float()
            self.terms[0] += torch.stack(out.hard) * len(y)
            self.terms[1] += torch.stack(out.soft) * len(y)
            if "teacher_ce" in out.extra:
                self.terms[2, 0] += out.extra["teacher_ce"] * len(y)
                self.has_teacher = True
            self.seen += len(y)

    def state(self) -> dict[str, Any]:
        return {"total": self.total.cpu(), "hits": self.hits.cpu(), "terms": self.terms.cpu(), "seen": self.seen}

    def result(self, run: Run) -> tuple[float, list[float], dict[str, Any]]:
        """Summed over the ranks: the mean loss, each head's training top-1, the objective's mean terms."""
        heads = len(self.hits)
        stats = torch.cat([self.total.reshape(1), torch.tensor([float(self.seen)], device=run.proc.device),
                           self.hits, self.terms.flatten()])
        if run.layout.shards:  # instances: every rank saw the same batches
            torch.distributed.all_reduce(stats)
        n = stats[1].item()
        fit = [round(h * 100 / n, 2) for h in stats[2:2 + heads].tolist()]
        t = (stats[2 + heads:].reshape(3, heads) / n).tolist()
        logged = {"objective": run.objective.name, "hard": [round(v, 5) for v in t[0]],
                  "soft": [round(v, 5) for v in t[1]]}
        if self.has_teacher:  # the objective reported its learned teacher's CE (ONE, PCL)
            logged["teacher_ce"] = round(t[2][0], 5)
        return stats[0].item() / n, fit, logged


def _gather(run: Run, obj: Any) -> list[Any]:
    """One object per rank (RNG states), in rank order."""
    if not run.proc.distributed:
        return [obj]
    out = [None] * run.proc.world
    torch.distributed.all_gather_object(out, obj)
    return out


def _optim_state(run: Run) -> dict[str, Any]:
    """What the checkpoint keeps of the optimizer, schedule and scaler (collective: the layout gathers)."""
    return {"optimizer": run.layout.optimizer_state(run.optimizer),
            "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
            "scaler": run.scaler.state_dict() if run.scaler is not None else None}


def _recovery_point(run: Run, epoch: int, step: int, epoch_rng: list[Any], sums: dict[str, Any]) -> None:
    """``recovery/``: the weights and everything else after ``step`` batches of ``epoch``."""
    rngs = _gather(run, rng_state())
    tree, optim = run.layout.saved_tree(run.tree), _optim_state(run)
    if not run.proc.primary:
        return
    state = {"epoch": epoch, "step": step, "epochs": run.recipe.epochs, **optim, "rng": rngs,
             "epoch_rng": epoch_rng, "sums": sums, "history": run.history, "best": run.best,
             "wall_time_s": run.wall_before + time.time() - run.t_start}
    run.dir.save_last(tree, state, run.ema.module if run.ema is not None else None, run.modules, where="recovery")


def _summary(run: Run, finished: bool, wall: float, best: dict[str, Any] | None = None) -> RunSummary:
    """The run's summary: accuracies at the best epoch (or at ``best``, another epoch's choice)."""
    best = best or run.best
    row = run.history[best["epoch"] - 1]
    heads = [{"index": i, "val_top1": v["top1"], "val_top5": v["top5"], "test_top1": t["top1"], "test_top5": t["top5"]}
             for i, (v, t) in enumerate(zip(row["val"]["heads"], row["test"]["heads"]))]
    ens = {"val_top1": row["val"]["ensemble"]["top1"], "val_top5": row["val"]["ensemble"]["top5"],
           "test_top1": row["test"]["ensemble"]["top1"], "test_top5": row["test"]["ensemble"]["top5"]}
    sp = run.splits
    return {"run": str(run.dir), "finished": finished, "epochs_done": len(run.history), "epochs": run.recipe.epochs,
            "best_epoch": best["epoch"], "best_head": best["head"], "heads": heads, "ensemble": ens,
            "objective": run.objective.describe(), "weights": "ema" if run.ema is not None else "model",
            "best_dir": "best",
            "num_classes": sp.num_classes, "label_names": sp.label_names, "samples": sp.sizes(),
            "label_noise": sp.noise, "device": str(run.proc.device), "world_size": run.proc.world,
            "parallel": run.layout.mode,
            "wall_time_s": round(wall, 1)}


def _log_epoch(run: Run, row: dict[str, Any]) -> None:
    def accs(m):
        return " ".join(f"{h['top1']:.1f}" for h in m["heads"]) + f" | ens {m['ensemble']['top1']:.1f}"

    evals = f"val top1 {accs(row['val'])}  test top1 {accs(row['test'])}  " if "val" in row else ""
    run.log(f"epoch {row['epoch']}/{run.recipe.epochs} loss {row['train_loss']:.4f} lr {row['lr']:.3g} "
            f"{evals}[{row['time_s']:.0f}s]")


def _checkpoint(run: Run, epoch: int, improved: bool, judged: HeadTree, t0: float) -> None:
    """Save ``best/`` (with its record) if improved, then ``last/`` and the summary; primary only (the layout
    gathers the tree and the optimizer state on every rank first)."""
    rngs = _gather(run, rng_state())
    tree, optim = run.layout.saved_tree(run.tree), _optim_state(run)
    if run.ema is None:  # what is judged is the tree: save it as one process holds it
        judged = tree
    if not run.proc.primary:
        return
    summary = _summary(run, finished=epoch + 1 == run.recipe.epochs, wall=time.time() - t0) if run.best else None
    if improved:
        run.dir.save_best(judged, summary)
    if run.recipe.checkpoint_hist > 1 and "val" in run.history[epoch]:  # this epoch among the N best by its best
        # head's validation top-1
        val = run.history[epoch]["val"]["heads"]
        head = max(range(len(val)), key=lambda h: val[h]["top1"])
        mine = {"epoch": epoch + 1, "head": head, "val_top1": val[head]["top1"]}
        run.dir.save_history(judged, _summary(run, summary["finished"], time.time() - t0, mine),
                             keep=run.recipe.checkpoint_hist)
    state = {"epoch": epoch + 1, "epochs": run.recipe.epochs, **optim, "rng": rngs,
             "history": run.history, "best": run.best, "wall_time_s": time.time() - t0}
    run.dir.save_last(tree, state, run.ema.module if run.ema is not None else None, run.modules)
    run.dir.drop_recovery()
    if summary is not None:  # before the first evaluated epoch (eval_every) there is no best to summarise
        run.dir.write_summary(summary)


def fit(run: Run, stop_after: int | None = None) -> dict[str, Any]:
    """The epoch loop: train, average BN over ranks, evaluate, step the schedule, checkpoint."""
    r, proc = run.recipe, run.proc
    if proc.primary:  # a resumed run's recipe differs at most in resume-free keys or a longer `epochs`
        run.dir.write_recipe(r)
        run.dir.record_data_config(r, run.tree.spec)  # the preprocessing collapse exports (not the editable recipe.yaml)
    run.log(f"training {run.tree.num_heads} heads of {run.tree.spec.label} on {run.splits.sizes()} samples "
            f"({run.splits.num_classes} classes) on {proc.device}" + (f" x {proc.world} processes" if proc.distributed
                                                                         else "") + f"; run dir {run.dir}")
    end = r.epochs if stop_after is None else min(r.epochs, run.start + stop_after)
    run.t_start = time.time()
    trackers = tracking.Trackers(run.dir.path, r, run.start, len(run.splits.train), run.log) \
        if proc.primary else None  # summary.csv, TensorBoard, W&B (recipe log.*)
    t0 = run.t_start - run.wall_before
    for epoch in range(run.start, end):
        *trained, t_train = _train_and_sync(run, epoch)
        judged = run.task.evaluated_tree
        row, improved = _evaluate_epoch(run, epoch, judged, *trained, t0)
        if proc.primary:
            run.dir.append_metrics(row)
            if "val" in row:  # the trackers' rows are evaluated epochs (timm's summary.csv has eval columns)
                trackers.epoch(row, run.best, train_s=t_train)
        _checkpoint(run, epoch, improved, judged, t0)
        if proc.primary:
            _log_epoch(run, row)
        if proc.distributed:
            torch.distributed.barrier()
    if trackers is not None:
        trackers.close()
    return _finish(run, t0)


def _train_and_sync(run: Run, epoch: int) -> tuple[float, list[float], dict[str, Any], float]:
    """:func:`train_epoch` (CUDA out of memory as one line naming a batch size that fits better), then
    BN running statistics averaged over the ranks; also returns the seconds the training took."""
    from timm.utils import distribute_bn

    r, proc = run.recipe, run.proc
    shards = run.layout.shards
    if shards:
        run.train_loader.sampler.set_epoch(epoch)
    try:
        t_train = time.time()
        loss, fit_, terms = train_epoch(run, epoch)
        t_train = time.time() - t_train
    except torch.cuda.OutOfMemoryError:
        raise HeadsurgeonError(f"CUDA out of memory at batch size {r.data.batch_size} per process; use a smaller "
                               f"batch, e.g. --set data.batch_size={max(1, r.data.batch_size // 2)}") from None
    if shards and not (r.sync_bn and proc.device.type == "cuda"):
        distribute_bn(run.tree, proc.world, reduce=True)  # average BN running stats over ranks
        if run.objective.needs_mean_logits:  # PCL's temporal mean updates its own BN stats on each rank's batches
            distribute_bn(run.ema.module, proc.world, reduce=True)
    return loss, fit_, terms, t_train


def _evaluate_epoch(run: Run, epoch: int, judged: HeadTree, loss: float, fit_: list[float], terms: dict[str, Any],
                    t0: float) -> tuple[dict[str, Any], bool]:
    """The epoch's row (evaluated every ``eval_every`` epochs and at the last), the schedule's epoch step,
    and the run's best head by validation; returns the row and whether the best improved."""
    r, proc = run.recipe, run.proc
    lr = run.optimizer.param_groups[0]["lr"]  # the lr this epoch ended with (before the epoch step)
    evaluated = (epoch + 1) % r.eval_every == 0 or epoch + 1 == r.epochs
    shards, lockstep = run.layout.shards, run.layout.lockstep
    metrics = {k: evaluate(judged, v, proc.device, run.autocast, r.channels_last, shards, lockstep)
               for k, v in run.eval_loaders.items()} if evaluated else {}
    if run.scheduler is not None:
        run.scheduler.step(epoch + 1, max(h["top1"] for h in metrics["val"]["heads"]) if evaluated else None)
    row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss, "train_top1": fit_, "loss_terms": terms,
           "time_s": round(time.time() - t0, 2), **metrics}
    if isinstance(run.objective, O.CL) and run.objective.beta_end is not None:  # the late-consensus beta trained with
        row["beta"] = run.objective.beta_now
    if run.fit_eval is not None and ((epoch + 1) % r.log.fit_every == 0 or epoch + 1 == r.epochs):
        row["fit"] = evaluate_fit(judged, *run.fit_eval, run.splits.num_classes, proc.device, run.autocast,
                                  r.channels_last, shards, lockstep)
    run.history.append(row)
    improved = False
    if evaluated:
        head = max(range(run.tree.num_heads), key=lambda h: metrics["val"]["heads"][h]["top1"])
        improved = run.best is None or metrics["val"]["heads"][head]["top1"] > run.best["val_top1"]
        if improved:
            run.best = {"epoch": epoch + 1, "head": head, "val_top1": metrics["val"]["heads"][head]["top1"]}
    return row, improved


def _finish(run: Run, t0: float) -> dict[str, Any]:
    """The summary :func:`train` returns; the primary also writes it and ``curves.png``."""
    r, proc = run.recipe, run.proc
    if run.best is None:  # stopped (stop_after) before the first evaluated epoch (eval_every): nothing chosen yet
        return {"run": str(run.dir), "finished": False, "epochs_done": len(run.history), "epochs": r.epochs,
                "best_epoch": None, "wall_time_s": round(time.time() - t0, 1)}
    summary = _summary(run, finished=len(run.history) == r.epochs, wall=time.time() - t0)
    if proc.primary and run.history:
        if not run.dir.plot(run.history):
            run.log("matplotlib is not installed; no curves.png")
        run.dir.write_summary(summary)
    return summary


def train(recipe: R.Recipe, name: str = "run", output: str | None = None, resume: bool = False,
          stop_after: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the recipe's tree; returns the run summary (also written to ``OUTPUT/summary.json``).

    ``stop_after`` trains at most that many epochs in this call (a pre-emptible job's slice);
    ``resume`` continues the run in ``output`` from its ``last`` checkpoint.
    """
    if stop_after is not None and stop_after < 1:
        raise HeadsurgeonError(f"--stop-after (stop_after) must be at least 1, got {stop_after}: the number of epochs "
                               f"to train in this call, e.g. --stop-after 1")
    run = build(recipe, name, output, resume, log)
    failed = True
    try:
        if resume:
            restore(run)
            if run.start >= recipe.epochs:
                raise HeadsurgeonError(f"run '{run.dir}' already finished its {recipe.epochs} epochs")
        # Each full collection of Python's cyclic GC walks every tracked object: the ~400k that torch,
        # timm and the traced tree leave cost ~0.4 s a time (CPU), inside the epoch (benchmarks.md,
        # timm's train.py). The run's long-lived objects are frozen out of it while it trains.
        gc.collect()
        gc.freeze()
        summary = fit(run, stop_after)
        failed = False
        return summary
    except KeyboardInterrupt:  # click then prints only "Aborted!"
        if run.proc.primary:
            done = len(run.history)
            log(f"interrupted with {done} epoch(s) finished in '{run.dir}'; continue with `headsurgeon train --resume "
                f"-o {run.dir}`" if done or run.dir.resumable() else f"interrupted before the first epoch finished; "
                f"nothing in '{run.dir}' to keep: run the same command again to start over")
        raise
    finally:
        gc.unfreeze()
        if run.proc.primary:
            run.dir.unlock()
            if failed and not resume:
                run.dir.discard_if_unstarted()
        if run.proc.distributed:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

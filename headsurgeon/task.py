"""``CollaborativeTask``: a tree of heads and everything its objective trains, as one ``nn.Module``.

An own training loop (plain PyTorch, Lightning, Accelerate, timm's ``train.py``) needs more than the
objective's loss: ONE's gate pools the trunk output at the first fork, PCL's peer ensemble reads
every head's pre-logits features and distils from a temporal mean (EMA) of the tree. The task owns
the feature hooks, the width probe, the gate or ensemble, the temporal mean and their checkpoint
state, so that::

    task = hs.CollaborativeTask(tree, "pcl", ema_decay=0.99)
    opt = timm.optim.create_optimizer_v2(task, "sgd", lr=0.1)   # task.parameters(): all there is to optimise
    for epoch in range(epochs):
        task.set_epoch(epoch)                                  # the objectives' ramp-ups
        for x, y in loader:
            out = task(x, y)                                    # LossOut: loss, logits, hard, soft, extra
            out.loss.backward(); opt.step(); opt.zero_grad()
            task.after_step()                                   # the temporal mean (no-op without one)
    model = task.collapse(head=0)                               # pcl: from the temporal mean; a verified timm model

It is a ``timm.task.TrainingTask`` (timm >= 1.0.31): ``task(x, y)["loss"]`` and ``["output"]`` (the
heads' mean logits), ``prepare_distributed``, ``no_sync``, ``compile``, ``update_ema``,
``get_eval_model`` and ``get_checkpoint_state`` follow that contract. ``headsurgeon train`` is its
first consumer (:mod:`headsurgeon.train`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
from timm.task import TrainingTask

from . import objectives as O
from .errors import HeadsurgeonError
from .modes import eval_mode
from .tree import HeadTree

__all__ = ["CollaborativeTask", "evaluate", "evaluate_fit", "temporal_mean"]


def temporal_mean(tree: HeadTree, objective: O.Objective, decay: float | bool = False) -> Any:
    """The EMA of the tree (timm's ``ModelEmaV3``) the objective or ``decay`` asks for, or None.

    PCL's temporal mean and a plain weight EMA are one thing, not two: an EMA of the tree that is
    evaluated and exported. PCL also distils from it, with its own decay and the re-implementation's
    warm-up a = min(1 - 1/(k + 1), decay) at the k-th optimizer step (``update_after_step=-1`` makes
    timm's warm-up 1 - (1 + k)^-1 count from the first step). Its parameters do not require grad, so
    optimizers built from ``task.parameters()`` (timm's factory skips them) never step them.
    """
    from timm.utils import ModelEmaV3

    if objective.needs_mean_logits:
        ema = ModelEmaV3(tree, decay=objective.ema_decay, use_warmup=True, warmup_gamma=1.0, warmup_power=1.0,
                         update_after_step=-1)
    elif decay:
        ema = ModelEmaV3(tree, decay=decay)
    else:
        return None
    ema.module.requires_grad_(False)
    return ema


def _eval_batches(tree: HeadTree, loader, device: torch.device, autocast: Callable, channels_last: bool,
                  lockstep: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches on ``device``; iterate it in eval mode under ``no_grad``. With ``lockstep`` (a
    sharded tree: under FSDP every forward all-gathers each segment's shards), a rank whose shard has fewer
    batches then runs empty forwards until it has run as many as the rank with the most. That count is
    agreed *before* the first forward: a collective issued later, while another rank is mid-forward,
    would pair with that forward's all-gathers and hang both."""
    most = 0
    if lockstep:
        agreed = torch.tensor([len(loader)], device=device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        most = int(agreed.item())
    batches, empty = 0, None
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y
        batches, empty = batches + 1, x[:0]
    for _ in range(most - batches):
        with autocast():
            tree(empty if empty is not None else torch.zeros(0, *tree.spec.input_size, device=device))


def evaluate(tree: HeadTree, loader, device: torch.device | str | None = None, autocast: Callable = contextlib.nullcontext,
             channels_last: bool = False, distributed: bool = False, lockstep: bool = False) -> dict[str, Any]:
    """Per-head and ensemble (mean of logits) top-1/top-5, exact over the whole split (counts, not
    means of batch means; all-reduced over ranks with ``distributed``; ``lockstep``: as many forwards on
    every rank, for a sharded tree)."""
    from timm.utils import accuracy

    device = torch.device(device) if device is not None else next(tree.parameters()).device
    heads = tree.num_heads
    correct = torch.zeros(heads + 1, 2, dtype=torch.float64, device=device)
    n = torch.zeros((), dtype=torch.float64, device=device)
    with eval_mode(tree), torch.no_grad():
        for x, y in _eval_batches(tree, loader, device, autocast, channels_last, lockstep):
            with autocast():
                outs = [o.float() for o in tree(x)]
            k = min(5, outs[0].shape[1])
            for i, o in enumerate([*outs, torch.stack(outs).mean(0)]):
                a1, a5 = accuracy(o, y, topk=(1, k))
                correct[i] += torch.stack([a1, a5]).to(correct) * len(y) / 100
            n += len(y)
    if distributed:
        torch.distributed.all_reduce(correct)
        torch.distributed.all_reduce(n)
    if not n.item():
        raise HeadsurgeonError("evaluate: the loader yielded no samples; an empty split has no accuracy")
    acc = (correct.round() * 100 / n).tolist()  # round: counts are integers, percentages exact
    per = [{"top1": a[0], "top5": a[1]} for a in acc]
    return {"heads": per[:heads], "ensemble": per[heads], "n": int(n.item())}


def evaluate_fit(tree: HeadTree, loader, offsets: dict[int, int], classes: int, device: torch.device,
                 autocast: Callable = contextlib.nullcontext, channels_last: bool = False,
                 distributed: bool = False, lockstep: bool = False) -> dict[str, Any]:
    """How each head fits its training labels: ``loader`` yields the training images un-augmented with
    their *true* labels, in order; ``offsets`` (sample index -> label offset) are the flipped ones.
    Top-1 against the noisy labels trained on, against the true labels, and on the flipped samples the
    share predicted as their noisy label ('memorised'): the memorisation regime of the literature."""
    heads = tree.num_heads
    counts = torch.zeros(heads, 3, dtype=torch.float64, device=device)  # noisy hits, true hits, memorised
    n = torch.zeros(2, dtype=torch.float64, device=device)  # samples, flipped samples
    seen = 0
    with eval_mode(tree), torch.no_grad():
        for x, y in _eval_batches(tree, loader, device, autocast, channels_last, lockstep):
            off = torch.tensor([offsets.get(i, 0) for i in range(seen, seen + len(y))], device=device)
            noisy, flipped = (y + off) % classes, off != 0
            with autocast():
                preds = torch.stack([o.float().argmax(1) for o in tree(x)])
            counts[:, 0] += (preds == noisy).sum(1)
            counts[:, 1] += (preds == y).sum(1)
            counts[:, 2] += ((preds == noisy) & flipped).sum(1)
            n += torch.tensor([len(y), int(flipped.sum())], dtype=torch.float64, device=device)
            seen += len(y)
    if distributed:
        torch.distributed.all_reduce(counts)
        torch.distributed.all_reduce(n)

    def pct(c: torch.Tensor, d: torch.Tensor) -> list[float] | None:
        return [round(v, 4) for v in (c * 100 / d).tolist()] if d.item() else None

    return {"noisy": pct(counts[:, 0], n[0]), "true": pct(counts[:, 1], n[0]),
            "memorised": pct(counts[:, 2], n[1]), "n": int(n[0].item()), "flipped": int(n[1].item())}


def _first_float(values: Any) -> torch.Tensor:
    for v in values if isinstance(values, (tuple, list)) else (values,):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    raise HeadsurgeonError("loss.objective 'one' needs a tensor at the first fork; this tree passes none")


class CollaborativeTask(TrainingTask):
    """A tree of heads, its objective and the objective's own modules and temporal mean.

    ``tree``: a :class:`HeadTree` (``hs.split``). ``objective``: a registered name (``"cl"``, ``"dml"``,
    ``"one"``, ``"kdcl"``, ``"pcl"``, see :data:`headsurgeon.objectives.OBJECTIVES`) with its
    parameters as keywords, or an :class:`~headsurgeon.objectives.Objective`. ``ema``: a weight EMA
    decay (or True for timm's 0.9998) for objectives without a temporal mean of their own (PCL keeps
    one, ``ema_decay``). ``input_size`` (C, H, W): the probe batch that tells ONE's and PCL's feature
    widths (default: the size the tree was cut at).
    """

    def __init__(self, tree: HeadTree, objective: str | O.Objective = "cl", *, ema: bool | float = False,
                 input_size: Sequence[int] | None = None, verbose: bool = False, **params: Any):
        if not isinstance(tree, HeadTree):
            raise HeadsurgeonError(f"CollaborativeTask takes a HeadTree (headsurgeon.split(...)), not "
                                   f"{type(tree).__name__}")
        p = next(tree.parameters())
        super().__init__(device=p.device, dtype=p.dtype, verbose=verbose)
        if isinstance(objective, str):
            self.objective = O.get(objective, **params)
        elif params:
            raise HeadsurgeonError(f"objective parameters {sorted(params)} go with an objective name; this "
                                   f"{type(objective).__name__} is already built")
        else:  # an Objective, or anything that quacks like one
            self.objective = objective
        if self.objective.needs_mean_logits and ema is not False:
            raise HeadsurgeonError(f"objective '{self.objective.name}' keeps its own temporal mean (EMA) of the tree, "
                                   f"which is evaluated and exported; set its decay with ema_decay and leave ema off")
        self.trainable_module = tree
        object.__setattr__(self, "_tree", tree)  # the plain tree, whatever wraps trainable_module later
        # made before any hook is registered: a deep copy would carry them (and write into our dict)
        self.trainable_module_ema = temporal_mean(tree, self.objective, ema)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long, device=p.device))
        self._features: dict[Any, torch.Tensor] = {}
        self._compiled: Callable | None = None
        self._ddp: list[Any] = []  # what no_sync() enters: DDP wrappers, or a layout's own (headsurgeon.parallel)
        self._wrapped = False  # trainable_module is a DDP wrapper or a layout's forward
        object.__setattr__(self, "_exchange", None)  # an instances layout's forward (every head's logits)
        self.objective_modules: nn.Module | None = None
        source = self.objective.feature_source
        if source is not None and tree.num_heads > 1:
            size = tuple(input_size or tree.spec.input_size or (3, 224, 224))
            if source == "fork":
                channels, classes = self._hook_fork(tree, size)
            elif source == "heads":
                channels, classes = self._hook_heads(tree, size)
            else:
                raise HeadsurgeonError(f"objective '{self.objective.name}' needs features from '{source}', which "
                                       f"CollaborativeTask does not provide")
            self.objective_modules = self.objective.make_modules(channels, tree.num_heads, classes)
            if self.objective_modules is not None:
                self.objective_modules.to(p.device)

    # ------------------------------------------------------------------ what the loop calls

    @property
    def tree(self) -> HeadTree:
        """The live tree (not its DDP or compiled wrapper)."""
        return self._tree

    @property
    def ema(self) -> Any:
        """The temporal mean (timm ``ModelEmaV3``), or None."""
        return self.trainable_module_ema

    @property
    def teacher(self) -> HeadTree | None:
        """The tree whose logits are the objective's ``mean_logits`` (PCL's temporal mean), or None."""
        if self.objective.needs_mean_logits and self.tree.num_heads > 1:
            return self.trainable_module_ema.module
        return None

    @property
    def evaluated_tree(self) -> HeadTree:
        """What is evaluated, chosen and exported: the temporal mean where there is one, else the tree (under
        an ``instances`` layout, its forward: this rank's head and the others' logits)."""
        if self.trainable_module_ema is not None:
            return self.trainable_module_ema.module
        return self._exchange if self._exchange is not None else self.tree

    @property
    def features(self) -> dict[Any, torch.Tensor]:
        """What the feature hooks left from the last forward that the objective did not take: ``"fork"``
        (ONE: the trunk output at the first fork) or head index -> pre-logits features (PCL)."""
        return self._features

    @property
    def find_unused_parameters(self) -> bool:
        """What DDP must be told: the source model registers weights its forward never reads."""
        return self.tree.has_unused_parameters

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> O.LossOut:
        """The objective's loss of one batch (``target``: class indices or soft targets, e.g. timm's Mixup)."""
        logits = (self.trainable_module if self._wrapped else self._compiled or self.trainable_module)(x)
        mean = None
        teacher = self.teacher
        if teacher is not None:  # PCL's temporal mean runs on the same batch, in the task's mode, without grad
            if teacher.training != self.training:  # a loop that sets modes per submodule (Lightning) keeps it eval
                teacher.train(self.training)
            with torch.no_grad():
                mean = teacher(x)
        out = self.objective(logits, target, features=self._take_features(), modules=self.objective_modules,
                             mean_logits=mean)
        out.logits = list(logits)
        return out

    def set_epoch(self, epoch: int) -> None:
        """At the start of every epoch (0-based): the objectives' ramp-ups."""
        self.objective.set_epoch(epoch)

    def after_step(self, step: int | None = None) -> None:
        """After every optimizer step: the temporal mean follows the tree. ``step`` (0-based optimizer
        steps) defaults to the task's own count, which is checkpointed with it."""
        if self.trainable_module_ema is not None:
            self.trainable_module_ema.update(self.tree, step=int(self.num_updates) if step is None else step)
        self.num_updates += 1

    def update_ema(self, step: int | None = None) -> None:  # timm.task.TrainingTask's name for it
        self.after_step(step)

    def collapse(self, head: int, probe: torch.Tensor | None = None) -> nn.Module:
        """Head ``head`` of the evaluated tree (the temporal mean for PCL) as a verified plain timm model."""
        return self.evaluated_tree.collapse(head, probe=probe)

    def evaluate(self, loader, device: torch.device | str | None = None, **kwargs: Any) -> dict[str, Any]:
        """Per-head and ensemble top-1/top-5 of the evaluated tree (:func:`evaluate`)."""
        return evaluate(self.evaluated_tree, loader, device, **kwargs)

    # ------------------------------------------------------------------ timm's optimizer factory

    def _tree_prefix(self) -> str:
        return next(name + "." for name, m in self.named_modules() if m is self.tree)

    def no_weight_decay(self) -> set[str]:
        """The source model's no-weight-decay parameters, by task name (timm also skips every 1-d one)."""
        prefix = self._tree_prefix()
        return {prefix + n for n in self.tree.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """The source model's layer groups for the tree's parameters (timm's layer-wise lr decay); the
        objective's gate or ensemble sits with the classifiers, in the last group (no decay of its lr)."""
        prefix, inner = self._tree_prefix(), self.tree.group_matcher(coarse)
        top = max((inner(n) for n, _ in self.tree.named_parameters()), default=0)
        return lambda name: inner(name[len(prefix):]) if name.startswith(prefix) else top

    # ------------------------------------------------------------------ distribution, compilation, state

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs: Any) -> "CollaborativeTask":
        """Wrap the tree and the objective's modules in DDP (the temporal mean stays local: every rank
        updates it from the same all-reduced weights)."""
        ddp = torch.nn.parallel.DistributedDataParallel
        ddp_kwargs.setdefault("find_unused_parameters", self.find_unused_parameters)
        self.trainable_module = ddp(self._compiled or self.tree, device_ids=device_ids, **ddp_kwargs)
        self._ddp, self._wrapped = [self.trainable_module], True
        if self.objective_modules is not None:
            self.objective_modules = ddp(self.objective_modules, device_ids=device_ids)
            self._ddp.append(self.objective_modules)
        return self

    def prepare_layout(self, forward: nn.Module | None = None, synced: Sequence[Any] = (),
                       objective_ddp: bool = False, device_ids: list | None = None) -> "CollaborativeTask":
        """What a layout of :mod:`headsurgeon.parallel` installs (``prepare_distributed`` is the DDP one):
        ``forward`` computes every head's logits in training and evaluation (the instances exchange; None:
        the tree, sharded in place by FSDP); ``synced`` have a ``no_sync()`` a gradient-accumulation
        micro-batch enters; ``objective_ddp`` wraps the objective's own modules (ONE's gate) in DDP."""
        if forward is not None:
            self.trainable_module = forward
            object.__setattr__(self, "_exchange", forward)
        self._ddp, self._wrapped = [*self._ddp, *synced], True
        if objective_ddp and self.objective_modules is not None:
            self.objective_modules = torch.nn.parallel.DistributedDataParallel(self.objective_modules,
                                                                               device_ids=device_ids)
            self._ddp.append(self.objective_modules)
        return self

    def no_sync(self) -> contextlib.AbstractContextManager:
        """No gradient all-reduce (the micro-batches before an accumulation group's last); a no-op
        outside DDP."""
        stack = contextlib.ExitStack()
        for m in self._ddp:
            stack.enter_context(m.no_sync())
        return stack

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs: Any) -> nn.Module:
        """``torch.compile`` the tree's forward (the hooks, the objective and the teacher stay eager)."""
        object.__setattr__(self, "_compiled", torch.compile(self.tree, backend=backend, mode=mode, **compile_kwargs))
        return self._compiled

    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False) -> nn.Module | None:
        if module is not None:
            return module
        if ema:
            return self.trainable_module_ema.module if self.trainable_module_ema is not None else None
        return self.teacher if self.teacher is not None else self.tree  # PCL is judged by its temporal mean

    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        mods = self.objective_modules
        state: dict[str, Any] = {"num_updates": int(self.num_updates)}
        if mods is not None:
            state["objective_modules"] = getattr(mods, "module", mods).state_dict()
        return state

    def load_task_state(self, state: dict[str, Any] | None, strict: bool = True, module: nn.Module | None = None,
                        ema: bool = False) -> None:
        if not state:
            return
        self.num_updates.fill_(int(state.get("num_updates", 0)))
        mods = self.objective_modules
        if mods is not None and "objective_modules" in state:
            getattr(mods, "module", mods).load_state_dict(state["objective_modules"], strict=strict)

    # ------------------------------------------------------------------ the feature hooks

    def _take_features(self) -> Any:
        source = self.objective.feature_source
        if source is None or self.objective_modules is None:
            return None
        if source == "fork":
            return self._features.pop("fork")
        return [self._features.pop(j) for j in range(self.tree.num_heads)]

    def _probe(self, tree: HeadTree, size: tuple[int, ...]) -> list[torch.Tensor]:
        """One eval-mode forward of a zero batch: the hooks fill their dict and reveal the widths."""
        p = next(tree.parameters())
        with eval_mode(tree), torch.no_grad():
            return list(tree(torch.zeros(1, *size, device=p.device, dtype=p.dtype)))

    def _hook_fork(self, tree: HeadTree, size: tuple[int, ...]) -> tuple[int, int]:
        """The trunk (level 0) leaves its output at the first fork: what ONE's gate pools. With
        ``at=["input"]`` the trunk passes the image through, so the gate sees the pooled image."""
        box = self._features
        tree.levels[0][0].register_forward_hook(lambda m, i, out: box.__setitem__("fork", _first_float(out)))
        outs = self._probe(tree, size)
        f = box.pop("fork")
        return int(f.shape[1] if f.ndim == 4 else f.shape[-1]), int(outs[0].shape[-1])  # NCHW; [B, N, C]; [B, C]

    def _hook_heads(self, tree: HeadTree, size: tuple[int, ...]) -> tuple[list[int], int]:
        """Every head's classifier input (a forward pre-hook on :meth:`HeadTree.classifier`: exactly what
        timm's ``forward_head(pre_logits=True)`` returns): what PCL's peer ensemble concatenates."""
        box = self._features
        for j in range(tree.num_heads):
            tree.classifier(j).register_forward_pre_hook(lambda m, args, j=j: box.__setitem__(j, args[0]))
        outs = self._probe(tree, size)
        if len(box) != tree.num_heads:
            raise HeadsurgeonError(f"loss.objective 'pcl' reads each head's classifier input, but the classifier of "
                                   f"{tree.spec.label} ran for {len(box)} of {tree.num_heads} heads; use another "
                                   f"objective")
        widths = []
        for j in range(tree.num_heads):
            f, m = box.pop(j), tree.classifier(j)
            width = getattr(m, "in_features", None) or getattr(m, "in_channels", None)  # Linear; a 1x1 conv
            widths.append(int(width or (f.shape[1] if f.ndim in (2, 4) else f.shape[-1])))
        return widths, int(outs[0].shape[-1])

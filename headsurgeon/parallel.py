"""How a tree is laid over the ranks of a ``torchrun`` job (recipe key ``parallel``).

- ``ddp`` (default): every rank holds the whole tree and a shard of each batch; gradients all-reduced.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``): every trunk and branch segment is a shard
  unit, so each rank keeps 1/N of the tree's parameters, gradients and optimizer state and gathers one
  segment at a time; a shard of each batch per rank, as under DDP.
- ``instances``: the codistillation layout (Anil et al. 2018; ``regime.md`` §4) for trees split at
  ``input`` and for heterogeneous peers: instance *i* lives on rank *i* alone, every rank trains on the
  same whole batch, and only logits cross the wire (B x C floats per step): each rank all-gathers the
  other instances' logits, detached, and forms the objective exactly as one process does. The gradient
  of the loss with respect to its own logits is the one a single process computes, so the run ends where
  the one-process run ends.

Every layout writes the checkpoint a one-process run writes: the full ``tree.safetensors`` (gathered on
rank 0 into a plain copy of the tree held on its CPU) and the optimizer state keyed as in one process, so
resume, collapse and push are unchanged and a run may resume under another layout.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .errors import HeadsurgeonError
from .tree import HeadTree

__all__ = ["MODES", "Layout", "layout_for", "check"]

MODES = ("ddp", "fsdp", "instances")


def is_instances_tree(tree_spec: Any) -> bool:
    """A tree of independent instances (split at ``input``) or of heterogeneous peers: no shared trunk."""
    return bool(tree_spec.peers) or tuple(tree_spec.at) == ("input",)


def check(mode: str, recipe: Any, tree: HeadTree, objective: Any) -> None:
    """One line for a combination that cannot work, before any process group or data exists."""
    if mode == "ddp":
        return
    r = recipe
    if r.compile:
        raise HeadsurgeonError(f"parallel: {mode} with compile is not supported; unset compile or use parallel: ddp")
    if r.ema or objective.needs_mean_logits:
        what = "ema" if r.ema else f"loss.objective {objective.name} (its temporal mean)"
        raise HeadsurgeonError(f"parallel: {mode} does not shard a weight EMA; {what} needs parallel: ddp")
    if mode == "fsdp" and r.amp == "fp16":
        raise HeadsurgeonError("parallel: fsdp trains in bf16 or fp32 (FSDP2's mixed precision); use amp: bf16")
    if mode == "instances":
        if not is_instances_tree(tree.spec):
            raise HeadsurgeonError(f"parallel: instances puts each instance on its own rank, but this tree shares a "
                                   f"trunk (split.at {list(tree.spec.at)}); split at input (split.at: [input]), use "
                                   f"peers, or use parallel: fsdp")
        if objective.feature_source == "heads":
            raise HeadsurgeonError(f"parallel: instances exchanges logits only; loss.objective {objective.name} reads "
                                   f"every head's features; use parallel: ddp")
        if r.optim.clip_grad:
            raise HeadsurgeonError("parallel: instances would clip each instance by its own gradient norm, not the "
                                   "tree's; unset optim.clip_grad or use parallel: ddp")


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _plain_optimizer_state(opt: Any, keep: Any) -> dict[str, Any]:
    """``opt.state_dict()`` with every tensor as a full CPU tensor (a DTensor gathered: collective); the
    state of parameters ``keep(p)`` refuses is left out."""
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i in sorted(sd["state"]):
        if not keep(params[i]):
            continue
        state[i] = {k: _local(v).cpu() if isinstance(v, torch.Tensor) else v for k, v in sd["state"][i].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


class Layout:
    """``ddp``, and the interface of the others: place the tree, wrap the task, gather what is saved."""

    mode = "ddp"
    data_parallel = True  # each rank a shard of every batch and split (ddp, fsdp); instances: the same batches
    lockstep = False  # fsdp: every forward gathers the shards, so every rank must run as many in evaluation

    def __init__(self, proc: Any, amp: str | None = None):
        self.proc, self.amp = proc, amp

    @property
    def shards(self) -> bool:
        """Whether each rank trains and evaluates its own shard of the data (all reduced over ranks)."""
        return self.proc.distributed and self.data_parallel

    def place(self, tree: HeadTree) -> None:
        """Before the task exists: the tree on this rank's device."""
        tree.to(self.proc.device)

    def wrap(self, task: Any) -> None:
        """After the task, before the optimizer (which must see the parameters as this layout leaves them)."""
        task.to(self.proc.device)
        if self.proc.distributed:
            task.prepare_distributed(device_ids=self._device_ids())

    def _device_ids(self) -> list | None:
        return [self.proc.device.index] if self.proc.device.type == "cuda" else None

    def saved_tree(self, tree: HeadTree) -> HeadTree | None:
        """The whole tree as one process holds it, on the primary (None elsewhere). Collective."""
        return tree

    def optimizer_state(self, opt: Any) -> dict[str, Any] | None:
        """The optimizer's state keyed as in one process, on the primary. Collective."""
        return opt.state_dict()

    def load_optimizer_state(self, opt: Any, state: dict[str, Any]) -> None:
        opt.load_state_dict(state)


class _Gathered(Layout):
    """A layout whose ranks hold parts of the tree: the primary keeps a plain CPU copy to save from."""

    def _keep_copy(self, tree: HeadTree) -> None:
        """Every rank starts from rank 0's tree (as DDP broadcasts it; a rank's own draw may differ), and
        the primary keeps a plain CPU copy that checkpoints are gathered into."""
        import torch.distributed as dist

        with torch.no_grad():
            for t in tree.state_dict().values():
                dist.broadcast(t, src=0)
        self.copy = copy.deepcopy(tree).cpu() if self.proc.primary else None


class FSDP(_Gathered):
    mode = "fsdp"
    lockstep = True

    def place(self, tree: HeadTree) -> None:  # stays on the CPU: fully_shard moves one shard per rank
        pass

    def wrap(self, task: Any) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        tree, proc = task.tree, self.proc
        self._keep_copy(tree)
        mesh = init_device_mesh(proc.device.type, (proc.world,))
        amp = {"bf16": torch.bfloat16}.get(self.amp) if proc.device.type == "cuda" else None
        policy = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if amp else MixedPrecisionPolicy()
        for segs in tree.levels:  # the segments are what the tree calls; the blocks inside a traced graph are not
            for seg in segs:
                if any(p.requires_grad for p in seg.parameters()):
                    fully_shard(seg, mesh=mesh, mp_policy=policy)
        fully_shard(tree, mesh=mesh, mp_policy=policy)
        grads = _GradientSync(tree)
        self.buffers = _BufferSync(tree, grads)
        _rest_to(task, proc.device)
        task.prepare_layout(synced=[grads], objective_ddp=True, device_ids=self._device_ids())

    def saved_tree(self, tree: HeadTree) -> HeadTree | None:
        full = {k: _local(v) for k, v in tree.state_dict().items()}  # every rank gathers, in the same order
        if not self.proc.primary:
            return None
        self.copy.load_state_dict({k: v.cpu() for k, v in full.items()})
        return self.copy

    def optimizer_state(self, opt: Any) -> dict[str, Any] | None:
        state = _plain_optimizer_state(opt, lambda p: True)
        return state if self.proc.primary else None

    def load_optimizer_state(self, opt: Any, state: dict[str, Any]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        opt.load_state_dict(state)
        for p, st in opt.state.items():
            if isinstance(p, DTensor):
                for k, v in st.items():
                    if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.shape == p.shape:
                        st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)


class _BufferSync:
    """Rank 0's buffers (batch-norm statistics) to every rank before a training forward, when DDP's
    ``broadcast_buffers`` would: before every forward that follows a gradient-synced one (DDP skips the
    forward after a ``no_sync`` micro-batch). The epoch-end averaging then sees what it sees under DDP,
    and ``fsdp`` ends where ``ddp`` ends."""

    def __init__(self, tree: nn.Module, grads: "_GradientSync"):
        self.grads, self.due = grads, True
        tree.register_forward_pre_hook(self.before)
        tree.register_forward_hook(self.after)

    def before(self, tree: nn.Module, args: Any) -> None:
        import torch.distributed as dist

        if not (tree.training and torch.is_grad_enabled() and self.due):
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in tree.buffers():
            by_dtype.setdefault(b.dtype, []).append(b)
        for bufs in by_dtype.values():  # one broadcast per dtype, not one per buffer
            flat = torch.cat([b.reshape(-1) for b in bufs])
            dist.broadcast(flat, src=0)
            for b, v in zip(bufs, flat.split([b.numel() for b in bufs])):
                b.copy_(v.view_as(b))

    def after(self, tree: nn.Module, args: Any, out: Any) -> None:
        if tree.training and torch.is_grad_enabled():
            self.due = self.grads.syncing


def _rest_to(task: Any, device: torch.device) -> None:
    """What the task holds beside the tree (the objective's modules, its step count) on the device."""
    if task.objective_modules is not None:
        task.objective_modules.to(device)
    task.num_updates.data = task.num_updates.data.to(device)


class _GradientSync:
    """``no_sync()`` for an FSDP2 module: no reduce-scatter on the micro-batches before a group's last."""

    def __init__(self, module: nn.Module):
        self.module, self.syncing = module, True

    def no_sync(self):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.module.set_requires_gradient_sync(False)
            self.syncing = False
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)
                self.syncing = True
        return ctx()


class Exchange(nn.Module):
    """Instance ``own`` of the tree on this rank; the other instances' logits all-gathered from their ranks.

    ``forward`` returns every head's logits as the tree does: this rank's with its graph, the others'
    detached. A loss of them has, with respect to this rank's logits, the gradient one process computes
    (the other heads' logits enter it as values either way, or the objective detaches them itself)."""

    def __init__(self, tree: HeadTree, own: int):
        super().__init__()
        self.tree, self.own = tree, own

    @property
    def num_heads(self) -> int:
        return self.tree.num_heads

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        import torch.distributed as dist

        mine = self.tree(x, heads=[self.own])[self.own]
        outs = [torch.empty_like(mine) for _ in range(self.tree.num_heads)]
        dist.all_gather(outs, mine.detach().contiguous())
        outs[self.own] = mine
        return outs


class Instances(_Gathered):
    mode = "instances"
    data_parallel = False

    def place(self, tree: HeadTree) -> None:  # stays on the CPU until the task is built; wrap moves this rank's part
        proc, n = self.proc, tree.num_heads
        if proc.world != n:
            raise HeadsurgeonError(f"parallel: instances runs one instance per rank: this tree has {n} instances but "
                                   f"the job has {proc.world} process(es); use torchrun --nproc_per_node {n} (or "
                                   f"--nnodes x --nproc_per_node = {n})")

    def wrap(self, task: Any) -> None:
        tree, proc = task.tree, self.proc
        self._keep_copy(tree)
        last = len(tree.levels) - 1
        for j, seg in enumerate(tree.levels[last]):  # the other instances leave this rank: shapes only
            seg.to(proc.device if j == proc.rank else "meta")
        for level in range(last):
            tree.levels[level].to(proc.device)
        _rest_to(task, proc.device)  # ONE's gate: on every rank, the same gradient from the same loss
        task.prepare_layout(forward=Exchange(tree, proc.rank))

    def _owner(self, name: str, last: int) -> int | None:
        parts = name.split(".", 3)
        return int(parts[2]) if parts[0] == "levels" and parts[1] == str(last) else None

    def saved_tree(self, tree: HeadTree) -> HeadTree | None:
        import torch.distributed as dist

        last, dev = len(tree.levels) - 1, self.proc.device
        out = {}
        for k, v in tree.state_dict().items():
            owner = self._owner(k, last)
            if owner is None:  # the trunk: the same on every rank
                t = v
            else:  # one tensor at a time from its owner
                t = v.to(dev) if self.proc.rank == owner else torch.empty(v.shape, dtype=v.dtype, device=dev)
                dist.broadcast(t, src=owner)
            if self.proc.primary:
                out[k] = t.detach().cpu()
        if not self.proc.primary:
            return None
        self.copy.load_state_dict(out)
        return self.copy

    def optimizer_state(self, opt: Any) -> dict[str, Any] | None:
        import torch.distributed as dist

        mine = _plain_optimizer_state(opt, lambda p: not p.is_meta)
        every = [None] * self.proc.world if self.proc.primary else None
        dist.gather_object(mine, every, dst=0)
        if not self.proc.primary:
            return None
        state: dict[int, Any] = {}
        for s in every:  # disjoint but for what every rank holds alike (ONE's gate)
            state.update(s["state"])
        return {"state": dict(sorted(state.items())), "param_groups": mine["param_groups"]}

    def load_optimizer_state(self, opt: Any, state: dict[str, Any]) -> None:
        opt.load_state_dict(state)  # the other instances' entries land on the meta device: shapes only


def layout_for(mode: str, proc: Any, amp: str | None = None) -> Layout:
    """The layout of ``parallel: mode`` for this process; one process is always plain (nothing to lay out)."""
    if mode not in MODES:
        raise HeadsurgeonError(f"parallel: '{mode}' is not a layout; choose one of {', '.join(MODES)}")
    if not proc.distributed and mode == "instances":
        raise HeadsurgeonError("parallel: instances needs one process per instance: launch with torchrun "
                               "--nproc_per_node N (N = the tree's heads), or use parallel: ddp")
    if not proc.distributed or mode == "ddp":
        return Layout(proc)
    return {"fsdp": FSDP, "instances": Instances}[mode](proc, amp)

"""Candidate split points of a model: where it can be cut and what a branch forked there costs.

Runs the traced eval graph once node by node (``fx.Interpreter``) at batch 1 with torch's
``FlopCounterMode`` around each node, so the FLOPs and parameters a branch would own are
read off cumulative sums instead of one cut per candidate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from .cut import INPUT, feature_points, last_index, point_names
from .trace import has_module, trace
from .modes import eval_mode
from .verify import input_error


@dataclass
class SplitPoint:
    name: str
    feature: bool  # named by timm's feature_info
    shape: str  # shape(s) of the module's output at batch 1
    branch_params: int  # parameters a branch forked here owns (cloned per branch)
    branch_flops: int  # FLOPs per image a branch forked here runs


def count_flops(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn(x)
    return int(fc.get_total_flops())


def _shape(v: Any) -> str:
    leaves = [t for t in torch.utils._pytree.tree_leaves(v) if isinstance(t, torch.Tensor)]
    return ", ".join("x".join(map(str, t.shape)) for t in leaves) or type(v).__name__


class _Profile(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.flops: dict[fx.Node, int] = {}
        self.shapes: dict[fx.Node, str] = {}

    def run_node(self, n: fx.Node) -> Any:
        with FlopCounterMode(display=False) as fc:
            out = super().run_node(n)
        self.flops[n] = int(fc.get_total_flops())
        self.shapes[n] = _shape(out)
        return out


def _tensors_of(model: nn.Module, n: fx.Node) -> list[torch.Tensor]:
    if n.op == "call_module":
        return list(model.get_submodule(n.target).parameters())
    if n.op == "get_attr":
        obj = model
        for part in str(n.target).split("."):
            obj = getattr(obj, part)
        return [obj] if isinstance(obj, nn.Parameter) else []
    return []


def split_points(model: nn.Module, input_size: Sequence[int], all_paths: bool = False,
                 max_depth: int = 2, leaf_modules: tuple[type, ...] = ()) -> tuple[list[SplitPoint], int, int]:
    """Candidate split points in forward order: ``feature_info`` modules first, then module paths.

    Returns the points, the model's parameter count and its FLOPs per image.
    """
    traced = trace(model, leaf_modules=leaf_modules)
    graph, names = traced.eval_graph, traced.eval_names
    prof = _Profile(fx.GraphModule(model, graph))
    with eval_mode(model), torch.no_grad():
        try:
            prof.run(torch.randn(1, *input_size))
        except Exception as e:
            name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
            raise input_error(model, name, input_size, e) from None
    nodes = list(graph.nodes)
    total_flops = sum(prof.flops.values())
    params = {id(p): p.numel() for p in model.parameters()}
    total_params = sum(params.values())
    cum_flops, cum_params, seen = [0], [0], set()
    for n in nodes:
        cum_flops.append(cum_flops[-1] + prof.flops.get(n, 0))
        new = 0
        for t in _tensors_of(model, n):
            if id(t) not in seen:
                seen.add(id(t))
                new += t.numel()
        cum_params.append(cum_params[-1] + new)

    chosen = feature_points(model, names)
    extra = [p for p in point_names(names)
             if p not in chosen and (all_paths or p.count(".") < max_depth) and has_module(model, p)]
    out = [SplitPoint(INPUT, False, _shape(torch.empty(1, *input_size)), total_params, total_flops)]
    first = {}
    for i, n in enumerate(nodes):
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        parts = names.get(n, "").split(".")
        for k in range(1, len(parts) + 1):
            first.setdefault(".".join(parts[:k]), i)
    for p in chosen + extra:
        c = first[p]
        last = nodes[last_index(graph, names, p)]
        out.append(SplitPoint(p, p in chosen, prof.shapes.get(last, "?"),
                              total_params - cum_params[c], total_flops - cum_flops[c]))
    head = out[: 1 + len(chosen)]
    tail = sorted(out[1 + len(chosen):], key=lambda s: first[s.name])
    return head + tail, total_params, total_flops

"""Resolve split points to positions in a traced graph and cut the graph into segments.

A split point is the first part each branch owns: ``layer3`` cuts just before the first node
recorded inside ``layer3``. Whatever values are live across that position (one tensor in a
ResNet; several in HRNet, XCiT, PiT, CrossViT; sometimes the model input) become the
outputs of the segment before and the placeholders of the segment after. Parameters read
through ``get_attr`` never cross: each segment re-reads the ones it uses.
"""
from __future__ import annotations

import difflib
from typing import Iterable, Sequence

from torch import fx, nn

from .errors import HeadsurgeonError

INPUT = "input"  # split point at the model input: N independent instances


def _ops(graph: fx.Graph) -> list[fx.Node]:
    return list(graph.nodes)


def owned_by(node: fx.Node, qualname: str, point: str) -> bool:
    """Whether ``node`` (recorded at ``qualname``) is part of split point ``point``: the module
    ``point`` or one inside it, or the fx node named ``point``. Inputs and attributes belong to no one."""
    if node.op in ("placeholder", "get_attr"):
        return False
    return qualname == point or qualname.startswith(point + ".") or node.name == point


def point_names(names: dict[fx.Node, str]) -> list[str]:
    """Every name a split point may use, in forward order: module paths first seen, node names."""
    seen: dict[str, None] = {}
    for node, q in names.items():
        if node.op in ("placeholder", "get_attr"):
            continue
        parts = q.split(".")
        for i in range(1, len(parts) + 1):
            seen.setdefault(".".join(parts[:i]), None)
    return list(seen)


def feature_points(model: nn.Module, names: dict[fx.Node, str]) -> list[str]:
    """timm ``feature_info`` modules that resolve in the graph, each once (Twins and MViTv2 name
    ``block.N`` modules that do not exist; CoaT names one fused module for several stages)."""
    have = set(point_names(names))
    feats = (f.get("module") for f in getattr(model, "feature_info", None) or [] if isinstance(f, dict))
    return [p for p in dict.fromkeys(feats) if p in have]


def resolve(graph: fx.Graph, names: dict[fx.Node, str], point: str, model_name: str,
            valid: Sequence[str] | None = None) -> int:
    """Index of the first node owned by ``point`` (a module path, a node qualname or fx name)."""
    nodes = _ops(graph)
    if point == INPUT:
        return next(i for i, n in enumerate(nodes) if n.op != "placeholder")
    for i, n in enumerate(nodes):
        if owned_by(n, names.get(n, ""), point):
            return i
    candidates = list(valid) if valid else point_names(names)
    near = difflib.get_close_matches(point, candidates, n=5, cutoff=0.5)
    rest = [c for c in candidates if c not in near]
    listed = ", ".join(near + rest[: max(0, 12 - len(near))]) + (", ..." if len(rest) > 12 - len(near) else "")
    raise HeadsurgeonError(
        f"unknown split point '{point}' for {model_name}; valid split points (nearest first): {listed} "
        f"(run `headsurgeon nodes {model_name}` for all of them)"
    )


def last_index(graph: fx.Graph, names: dict[fx.Node, str], point: str) -> int:
    """Index of the last node recorded inside ``point`` (its output)."""
    last = -1
    for i, n in enumerate(_ops(graph)):
        if owned_by(n, names.get(n, ""), point):
            last = i
    return last


def resolve_all(graph: fx.Graph, names: dict[fx.Node, str], points: Sequence[str], model_name: str,
                valid: Sequence[str] | None = None) -> list[int]:
    """Cut indices for ``points``; they must be in forward order and not nest in an earlier one."""
    idx = [resolve(graph, names, p, model_name, valid) for p in points]
    for k in range(1, len(points)):
        if idx[k] <= idx[k - 1]:
            prev, cur = points[k - 1], points[k]
            if cur == prev:
                why = f"'{cur}' is given twice"
            elif idx[k] == idx[k - 1]:
                why = f"'{cur}' and '{prev}' start at the same node"
            elif points[k] != INPUT and last_index(graph, names, cur) >= idx[k - 1]:
                why = f"'{prev}' lies inside '{cur}', which would already be cloned from '{cur}' on"
            else:
                why = f"'{cur}' runs before '{prev}'"
            first = {}  # one point per cut position (a duplicate or an alias adds no fork), in forward order
            for p, i in sorted(zip(points, idx), key=lambda pi: pi[1]):
                first.setdefault(i, p)
            raise HeadsurgeonError(
                f"split points must be distinct and in forward order: {why}; "
                f"list each once, as the model runs them, e.g. --at {','.join(first.values())}"
            )
    return idx


def live_values(nodes: list[fx.Node], cut: int) -> list[fx.Node]:
    """Values computed before ``cut`` and used at or after it (``get_attr`` is re-read, not passed)."""
    index = {n: i for i, n in enumerate(nodes)}
    return [n for n in nodes[:cut] if n.op != "get_attr" and any(index[u] >= cut for u in n.users)]


def cut_graph(graph: fx.Graph, cuts: Iterable[int]) -> list[fx.Graph]:
    """Split ``graph`` at node indices ``cuts`` into consecutive graphs.

    Segment ``s`` takes the values live at its start as placeholders and, unless it is the
    last, returns the values live at its end as a tuple (including ones it only passes on).
    """
    nodes = _ops(graph)
    bounds = [0, *cuts, len(nodes)]
    out = []
    for s in range(len(bounds) - 1):
        lo, hi = bounds[s], bounds[s + 1]
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        attrs: dict[str, fx.Node] = {}
        for n in live_values(nodes, lo) if s else []:
            env[n] = g.placeholder(n.name)

        def arg(a: fx.Node) -> fx.Node:
            if a in env:
                return env[a]
            if a.op == "get_attr":
                if a.target not in attrs:
                    attrs[a.target] = g.get_attr(a.target)
                return attrs[a.target]
            raise HeadsurgeonError(f"internal: node {a.name} used before it is defined in segment {s}")

        for n in nodes[lo:hi]:
            if n.op == "get_attr":
                continue
            env[n] = g.node_copy(n, arg)
        if hi < len(nodes):
            g.output(tuple(env[n] for n in live_values(nodes, hi)))
        g.lint()
        out.append(g)
    return out

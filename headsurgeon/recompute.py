"""Gradient checkpointing of a tree segment one block at a time.

A segment is one fx graph (a whole trunk, or a whole branch). Checkpointing it as one unit keeps
only its inputs in the forward pass, but the backward pass then recomputes the entire segment at
once, so the peak still holds all of that segment's activations (for a ResNet trunk: most of the
model's). Like timm's own ``checkpoint_seq``, this module recomputes one *block* at a time: the
segment's train graph is cut (with :func:`~headsurgeon.cut.cut_graph`, so whatever values are live
across a cut are passed on) where each block of the model starts, and every piece is
checkpointed on its own. The pieces are ``fx.GraphModule`` s over the segment's own submodules:
they share its parameters and are not registered, so names, ``state_dict`` and saving are unchanged.

A block is a child of a numbered container of modules that have children themselves
(``layer1.0``, ``blocks.3``, ``stages.2.blocks.1``); nodes outside any block (stems, pooling,
classifier) stay in the piece before them.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from .cut import cut_graph


def _is_blocks(m: nn.Module) -> bool:
    """A numbered container (Sequential, ModuleList, or fx's copy of one) of modules with children."""
    kids = list(m.named_children())
    return len(kids) >= 1 and all(n.isdigit() for n, _ in kids) and any(
        next(c.children(), None) is not None for _, c in kids)


def block_of(root: nn.Module, target: str) -> str | None:
    """The block a module path belongs to (the deepest one that holds no blocks itself), or None."""
    parts, mod, block = target.split("."), root, None
    for i, name in enumerate(parts):
        parent, mod = mod, getattr(mod, name, None)
        if not isinstance(mod, nn.Module):
            break
        if _is_blocks(parent):
            block = ".".join(parts[: i + 1])
            if not _is_blocks(mod) and not any(_is_blocks(c) for c in mod.children()):
                break
    return block


def block_cuts(root: nn.Module, graph: fx.Graph) -> list[int]:
    """Node indices where a new block starts (its first module call), after the first operation."""
    cuts, seen, first = [], set(), None
    for i, n in enumerate(graph.nodes):
        if n.op in ("placeholder", "get_attr"):
            continue
        first = i if first is None else first
        if n.op != "call_module":
            continue
        b = block_of(root, n.target)
        if b is not None and b not in seen:
            seen.add(b)
            if i > first:
                cuts.append(i)
    return cuts


def pieces(seg: nn.Module) -> list[fx.GraphModule] | None:
    """The segment's train graph cut at its blocks, as modules sharing its submodules; None for one block."""
    graph = getattr(seg, "train_graph", None) or getattr(seg, "graph", None)  # torchvision's DualGraphModule
    if not isinstance(graph, fx.Graph):
        return None
    cuts = block_cuts(seg, graph)
    if not cuts:
        return None
    return [fx.GraphModule(seg, g, class_name="Piece") for g in cut_graph(graph, cuts)]


def run(parts: Sequence[nn.Module], *args: Any) -> Any:
    """Run the pieces in turn, each checkpointed (its inputs kept, its insides recomputed in backward)."""
    from torch.utils.checkpoint import checkpoint

    vals: Any = args
    for p in parts:
        vals = checkpoint(p, *vals, use_reentrant=False)
    return vals


def mutates_input(parts: Sequence[nn.Module], *args: Any) -> bool:
    """Whether a piece writes in place into a value it is given (a checkpoint would then recompute it
    from the overwritten value). Run once with ``args``, gradients off; the caller sets the mode."""
    vals: Any = args
    for p in parts:
        ins = [t for t in tree_leaves(vals) if isinstance(t, torch.Tensor)]
        before = [t._version for t in ins]
        vals = p(*vals)
        if any(t._version != v for t, v in zip(ins, before)):
            return True
    return False

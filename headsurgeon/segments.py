"""The parts of a tree, one phase per function: trace and cut a model (:func:`cut_model`), check the
cut against the eager model (:func:`check_cut`), grow the levels of branch copies (:func:`grow`) and
draw their initial weights (:func:`draw_independent`). :func:`cut_peers` does the first two for
heterogeneous peers. ``split`` and ``HeadTree.load`` call them in that order.
"""
from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Sequence

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves
from torchvision.models.feature_extraction import DualGraphModule

from . import models, verify
from .cut import cut_graph, feature_points, point_names, resolve_all
from .errors import HeadsurgeonError, first_line
from .spec import SplitSpec
from .trace import Traced, trace


def cut_model(m: nn.Module, at: Sequence[str], leaf_modules: tuple[type, ...], label: str
              ) -> tuple[list[nn.Module], list[str], Traced]:
    """Trace ``m`` in both modes and cut it at ``at``: the segments, the keys no node reads, and the
    trace (:func:`check_cut` compares its whole graph with the eager model)."""
    traced = trace(m, label, leaf_modules)
    valid = None
    cuts = {}
    for mode, g, names in (("train", traced.train_graph, traced.train_names), ("eval", traced.eval_graph, traced.eval_names)):
        valid = valid or _valid_points(m, names)
        cuts[mode] = resolve_all(g, names, at, label, valid)
    tgs, egs = cut_graph(traced.train_graph, cuts["train"]), cut_graph(traced.eval_graph, cuts["eval"])
    for s, (tg, eg) in enumerate(zip(tgs, egs)):
        if sum(n.op == "placeholder" for n in tg.nodes) != sum(n.op == "placeholder" for n in eg.nodes):
            raise HeadsurgeonError(f"{label} passes different values across '{at[s - 1]}' in train and eval mode; "
                                   f"choose another split point or create the model with drop rates of 0")
    protos = [_segment(m, tg, eg) for tg, eg in zip(tgs, egs)]
    unused = _fix_keys(protos, m)
    return protos, unused, traced


def check_cut(m: nn.Module, traced: Traced, protos: list[nn.Module], size: Sequence[int], label: str,
              check: bool, owns_input: Sequence[bool] | None = None) -> list[bool]:
    """Per segment of :func:`cut_model`, whether it mutates a value it is given (probed unless
    ``owns_input`` is known).

    ``check`` compares the traced graph and the chain of segments with the eager model in both modes.
    """
    mutated = [False] * len(protos)
    example = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    if check:
        whole = _segment(m, traced.train_graph, traced.eval_graph)
        verify.check_against_eager(m, {"the traced graph": (whole, [whole]),
                                       "the cut model": (lambda x: _probe_chain(protos, x, mutated), protos)},
                                   example, label)
    elif owns_input is None:
        verify.run_both_modes(lambda x: _probe_chain(protos, x, mutated), example, m, *protos)
    else:
        mutated = list(owns_input)
    return mutated


def cut_peers(ms: Sequence[nn.Module], labels: Sequence[str], size: Sequence[int], leaf_modules: tuple[type, ...],
              check: bool, owns_input: Sequence[bool] | None = None
              ) -> tuple[list[list[nn.Module]], list[bool], list[list[str]]]:
    """The levels of a tree of peers: a trunk that passes the image on, then each peer's whole traced
    model (verified against its eager model when ``check``); the per-level input-mutation flags (probed
    unless ``owns_input`` is known); each peer's unused keys (kept in its own segment).

    Each peer is one whole segment rather than cut at ``input``: a cut there hands the branch every
    input of the model's forward (ViT's ``attn_mask=None`` too), which differ between architectures.
    """
    g = fx.Graph()
    g.output((g.placeholder("x"),))
    trunk = fx.GraphModule(nn.Module(), g, class_name="Segment")
    example = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    branches, mutates, unused = [], [False, False], []
    for i, (m, label) in enumerate(zip(ms, labels)):
        try:
            protos, keys, traced = cut_model(m, [], leaf_modules, label)
            check_cut(m, traced, protos, size, label, check, owns_input=[False])
            whole = protos[0]
            if owns_input is None:
                verify.run_both_modes(lambda x: _probe_chain([trunk, whole], x, mutates), example, m, whole)
        except HeadsurgeonError as e:  # say which peer
            raise HeadsurgeonError(f"peer {i} ({label}): {e}") from None
        except Exception as e:  # the eager model itself fails on the shared input
            raise HeadsurgeonError(f"peer {i} ({label}) does not run on the tree's input {'x'.join(map(str, size))} "
                                   f"({type(e).__name__}: {first_line(e)}); give "
                                   f"peers that take the same input (input_size=, or img_size= in that peer's "
                                   f"kwargs)") from None
        params = list(inspect.signature(whole.forward).parameters.values())
        if not params or any(p.default is inspect.Parameter.empty for p in params[1:]):
            raise HeadsurgeonError(f"peer {i} ({label}) needs more than the image as input "
                                   f"({', '.join(p.name for p in params)}); peers must be models called as model(x)")
        branches.append(whole)
        unused.append(keys)
    return [[trunk], branches], list(owns_input) if owns_input is not None else mutates, unused


def _valid_points(m: nn.Module, names: dict[fx.Node, str]) -> list[str]:
    """Split points to suggest: timm ``feature_info`` modules that resolve, then every other path."""
    feats = feature_points(m, names)
    return feats + [p for p in point_names(names) if p not in feats]


def _segment(root: nn.Module, tg: fx.Graph, eg: fx.Graph) -> fx.GraphModule:
    """One graph when train and eval trace alike, else torchvision's train/eval ``DualGraphModule``."""
    if tg.python_code(root_module="self").src == eg.python_code(root_module="self").src:
        return fx.GraphModule(root, tg, class_name="Segment")
    return DualGraphModule(root, tg, eg, class_name="Segment")


def _fix_keys(segs: list[fx.GraphModule], model: nn.Module) -> list[str]:
    """Keep trace-time constants out of the weights and unused weights in the trunk.

    fx stores tensor constants as ``_tensor_constantN`` buffers (extra keys that would break a
    strict reload); parameters no node reads would be missing from a collapsed model.
    """
    from torch.fx.graph_module import _copy_attr  # torch's own helper for copying a dotted attribute

    own = model.state_dict(keep_vars=True)
    for seg in segs:
        for key, buf in list(seg.named_buffers()):
            if key not in own:
                parent, _, leaf = key.rpartition(".")
                seg.get_submodule(parent).register_buffer(leaf, buf, persistent=False)
    seen = set().union(*(seg.state_dict().keys() for seg in segs))
    unused = [key for key in own if key not in seen]
    for key in unused:
        _copy_attr(model, segs[0], key)
    union = set().union(*(set(s.state_dict()) for s in segs))
    if union != set(own):
        raise HeadsurgeonError(f"internal: segment keys {sorted(union ^ set(own))[:5]} do not match the model")
    return unused


def _probe_chain(segs: list[nn.Module], x: torch.Tensor, mutated: list[bool]) -> Any:
    """Run segments in sequence; note which segment modifies a value it was given in place."""
    vals: Any = segs[0](x)
    for s in range(1, len(segs)):
        ins = [t for t in tree_leaves(vals) if isinstance(t, torch.Tensor)]
        before = [t._version for t in ins]
        vals = segs[s](*vals)
        mutated[s] |= any(t._version != v for t, v in zip(ins, before))
    return vals


def grow(protos: list[nn.Module], fanout: Sequence[int]) -> tuple[list[list[nn.Module]], set[int]]:
    """Levels of copies of each segment, and the ids of tensors every copy shares.

    A tensor read by more than one segment stays one tensor shared by every branch (CoaT), and so
    does a module whose every tensor is shared.
    """
    owners = [{id(t): t for t in [*p.parameters(), *p.buffers()]} for p in protos]
    counts: dict[int, int] = {}
    for o in owners:
        for k in o:
            counts[k] = counts.get(k, 0) + 1
    shared = {k for k, c in counts.items() if c > 1}
    memo: dict[int, Any] = {k: o[k] for o in owners for k in o if k in shared}
    for p in protos:
        for mod in p.modules():
            ts = [*mod.parameters(), *mod.buffers()]
            if ts and all(id(t) in shared for t in ts):
                memo[id(mod)] = mod
    levels: list[list[nn.Module]] = [[protos[0]]]
    for level in range(1, len(protos)):
        n = math.prod(fanout[:level])
        levels.append([protos[level]] + [copy.deepcopy(protos[level], dict(memo)) for _ in range(n - 1)])
    return levels, shared


def independent_keys(m: nn.Module, trained: set[str] | None, branch_init: str) -> set[str]:
    """Keys each cloned copy draws afresh: all, the ones that were not pretrained, or none."""
    keys = set(m.state_dict())
    if branch_init == "independent":
        return keys
    if branch_init == "pretrained":
        return keys - (trained or set())
    return set()


def has_stochastic(segs: Sequence[nn.Module]) -> bool:
    from timm.layers import DropBlock2d, DropPath

    for seg in segs:
        for mod in seg.modules():
            p = getattr(mod, "drop_prob", None) if isinstance(mod, (DropPath, DropBlock2d)) else (
                mod.p if isinstance(mod, nn.Dropout) else None)
            if p:
                return True
    return False


def draw_independent(levels: list[list[nn.Module]], spec: SplitSpec, keys: set[str], shared_ids: set[int]) -> None:
    """Give copy ``j`` of every cloned segment the weights of a fresh instance seeded ``spec.seed + j``.

    Copy 0 keeps the source's weights; each head is therefore made of timm's own
    initialisation of its architecture, drawn independently per copy.
    """
    width = max(len(segs) for segs in levels)
    for j in range(1, width):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed + j)
            fresh = models.model_from_peer(spec.peer(0)).state_dict()
        for segs in levels[1:]:
            if j < len(segs):
                with torch.no_grad():
                    for k, t in segs[j].state_dict(keep_vars=True).items():
                        if k in keys and id(t) not in shared_ids:
                            t.copy_(fresh[k])
        del fresh

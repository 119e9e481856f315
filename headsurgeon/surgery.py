"""The factory: :func:`split` turns a timm model (or a name, or a list of them: peers) into a :class:`HeadTree`.

It checks the arguments, creates the source model and runs the phases of :mod:`headsurgeon.segments`
(trace and cut, check, grow, draw) before recording what it did in a :class:`SplitSpec`.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Any, Sequence

import timm
import torch
from torch import nn

from . import models, segments
from .cut import INPUT
from .errors import HeadsurgeonError
from .spec import BRANCH_INITS, PEERS_FORMAT, Peer, SplitSpec
from .trace import class_path, import_classes
from .tree import HeadTree
from .version import __version__


def split(model: str | nn.Module | Sequence[str | nn.Module], at: Sequence[str] | str = (), heads: int | None = None,
          fanout: Sequence[int] | None = None, rescale: bool = True, branch_init: str | None = None, *,
          weights: str | os.PathLike | None = None, seed: int | None = None, input_size: Sequence[int] | None = None,
          verify: bool = True, leaf_modules: Sequence[type | str] = (), peer_kwargs: Sequence[dict[str, Any]] | None = None,
          **create_kwargs: Any) -> HeadTree:
    """Split a timm model into a tree of ``heads`` classifier heads.

    Args:
        model: a timm name (``resnet50``, ``local-dir:DIR``, ``hf-hub:user/repo``) or a timm model
            (copied, never modified); or a list of them, one per head: heterogeneous peers, each a whole
            model of its own architecture, forked at the input (``at`` must be ``"input"`` or omitted).
        at: split points in forward order (module paths like ``layer3``/``blocks.8``, fx node
            names, or ``"input"`` for independent instances). Each is the first part every branch owns.
        heads: number of leaves (default 1; with a list of models, its length).
        fanout: children per fork at each split point (product = heads); default: most balanced.
        rescale: insert the gradient-rescaling op (x 1/fan-out backward) at every fork.
        branch_init: ``"independent"`` (every cloned copy gets timm's own initialisation, drawn
            independently; the default for a randomly initialised model), ``"copy"`` (exact
            copies) or ``"pretrained"`` (the default with pretrained weights: ``pretrained=True``,
            ``weights=``, or a module): copy what was pretrained, draw the rest (e.g. a new classifier) per copy.
        weights: a local safetensors / timm checkpoint to load before splitting.
        seed: seed of the independent draws (default: drawn from torch's global RNG).
        input_size: (C, H, W) of the probe batch used to verify the cut; default the model's own.
        verify: compare the traced graph and the cut chain with the eager model in both modes.
        leaf_modules: extra module classes to keep whole when tracing (classes, or ``module:Class``
            strings as the CLI's ``--leaf-module`` and the recipe's ``split.leaf_modules`` give them).
        peer_kwargs: with a list of models, ``timm.create_model`` kwargs per peer (over ``create_kwargs``).
        **create_kwargs: passed to ``timm.create_model`` (``num_classes``, ``pretrained``, ...); every
            peer's, with a list of models.
    """
    at = [p for p in at.split(",") if p] if isinstance(at, str) else list(at)
    _check_args(heads, create_kwargs.get("num_classes"), input_size)
    leaf_modules = import_classes(leaf_modules)
    if isinstance(model, (list, tuple)):
        return _split_peers(list(model), at, heads, fanout, rescale, branch_init, weights, seed, input_size, verify,
                            leaf_modules, peer_kwargs, create_kwargs)
    if peer_kwargs is not None:
        raise HeadsurgeonError("peer_kwargs are per peer: give a list of models (one per head), or put the kwargs "
                               "in create_kwargs")
    heads = 1 if heads is None else heads
    fanout = _tree_shape(heads, at, fanout, branch_init)
    src = models.source(model, create_kwargs, weights)
    m, label = src.model, src.name or type(src.model).__name__
    if branch_init == "pretrained" and src.trained is None:  # it would silently be 'independent'
        raise HeadsurgeonError(f"branch_init 'pretrained' starts the branches from pretrained weights, but {label} is "
                               f"randomly initialised: give weights (--pretrained, --weights FILE or a trained module) "
                               f"or use branch_init independent or copy")
    arch, args = models.architecture(m), models.model_args(m)  # before tracing: a non-timm model fails fast
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    size = tuple(input_size) if input_size else models.default_input_size(m)
    protos, unused, traced = segments.cut_model(m, at, leaf_modules, label)
    owns = segments.check_cut(m, traced, protos, size, label, check=verify)
    spec = SplitSpec(
        source=src.name, architecture=arch, model_args=args, pretrained_cfg=models.pretrained_cfg(m),
        no_weight_decay=sorted(models.no_weight_decay(m)), unused=unused, at=at, heads=heads, fanout=fanout,
        rescale=bool(rescale), branch_init=branch_init or ("independent" if src.trained is None else "pretrained"),
        seed=int(seed), input_size=size,
        leaf_modules=[class_path(c) for c in leaf_modules], owns_input=owns,
        versions={"headsurgeon": __version__, "timm": timm.__version__, "torch": torch.__version__},
    )
    levels, shared = segments.grow(protos, fanout)
    fresh = segments.independent_keys(m, src.trained, spec.branch_init)
    if fresh and heads > 1:
        segments.draw_independent(levels, spec, fresh, shared)
    elif heads > 1 and spec.branch_init == "pretrained" and not segments.has_stochastic(protos[1:]):
        warnings.warn(
            f"all {heads} heads start as exact copies and {label} has no dropout/drop-path in its branches, so they will "
            f"stay identical and collaborative learning will do nothing; use branch_init='independent' "
            f"(--branch-init independent) or create the model with drop_path_rate/drop_rate > 0",
            stacklevel=2,
        )
    tree = HeadTree(levels, spec)
    tree.train(m.training)
    return tree


def _check_args(heads: Any, num_classes: Any, input_size: Sequence[int] | None) -> None:
    if heads is not None and (not isinstance(heads, int) or isinstance(heads, bool) or heads < 1):
        raise HeadsurgeonError(f"heads must be a positive integer, got {heads!r}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise HeadsurgeonError(f"num_classes must be a positive integer, got {num_classes!r} (0 would leave the model "
                               f"without a classifier: nothing to collapse into a classifier head)")
    if input_size is not None and (len(input_size) != 3 or any(not isinstance(v, int) or v < 1 for v in input_size)):
        raise HeadsurgeonError(f"input_size must be three positive integers (C, H, W), e.g. (3, 224, 224); "
                               f"got {tuple(input_size)}")


def _tree_shape(heads: int, at: list[str], fanout: Sequence[int] | None, branch_init: str | None) -> list[int]:
    """The fan-out per split point (default: most balanced), checked against the heads."""
    if heads > 1 and not at:
        raise HeadsurgeonError(f"{heads} heads need at least one split point; split at 'input' (--at input, at=['input']) "
                               f"for independent instances")
    fanout = default_fanout(heads, len(at)) if fanout is None else [int(f) for f in fanout]
    if len(fanout) != len(at) or math.prod(fanout) != heads or any(f < 1 for f in fanout):
        raise HeadsurgeonError(f"fan-out {fanout} does not match {len(at)} split point(s) and {heads} heads: "
                               f"give one positive factor per split point whose product is {heads}")
    if branch_init not in (None, *BRANCH_INITS):
        raise HeadsurgeonError(f"branch_init must be one of {', '.join(BRANCH_INITS)}, got {branch_init!r}")
    return fanout


def _split_peers(items: list[str | nn.Module], at: list[str], heads: int | None, fanout: Sequence[int] | None,
                 rescale: bool, branch_init: str | None, weights: Any, seed: int | None,
                 input_size: Sequence[int] | None, verify: bool, leaf_modules: tuple[type, ...],
                 peer_kwargs: Sequence[dict[str, Any]] | None, create_kwargs: dict[str, Any]) -> HeadTree:
    """:func:`split` for a list of models: head ``i`` is the whole of model ``i``, all fed the same input.

    Peer 0 is created from torch's global RNG and peer ``j >= 1`` under ``seed + j``, as the copies of
    a one-model split are; each peer is timm's own initialisation (or pretrained weights) of its model.
    """
    n = len(items)
    listed = ",".join(i if isinstance(i, str) else type(i).__name__ for i in items)
    if n < 2:
        raise HeadsurgeonError(f"a list of models gives one peer per head and needs at least two, got {n} "
                               f"({listed or 'none'}); pass a single model name for copies of one model")
    if at not in ([], [INPUT]):
        raise HeadsurgeonError(f"peers of different models ({listed}) share only the input: split them at 'input', "
                               f"not {','.join(at)} (--at input)")
    if heads not in (None, n):
        raise HeadsurgeonError(f"{n} models ({listed}) give {n} heads, one each, but heads is {heads}; "
                               f"drop --heads or list {heads} models")
    if fanout is not None and [int(f) for f in fanout] != [n]:
        raise HeadsurgeonError(f"{n} peers fork once at the input: fan-out is {n}, not {list(fanout)}; drop --fanout")
    if branch_init not in (None, "independent", "pretrained"):
        raise HeadsurgeonError(f"branch_init {branch_init!r} does not apply to peers of different models, which cannot "
                               f"be copies of each other; use independent or pretrained (or leave it out)")
    if weights is not None:
        raise HeadsurgeonError("weights= is one checkpoint for one model; peers of different models cannot share it "
                               "(start them from pretrained=True, or split without weights)")
    if peer_kwargs is not None and (len(peer_kwargs) != n or not all(isinstance(k, dict) for k in peer_kwargs)):
        raise HeadsurgeonError(f"peer_kwargs needs one mapping per model ({n}), got {peer_kwargs!r}")
    if any(not isinstance(i, (str, nn.Module)) or (isinstance(i, str) and not i.strip()) for i in items):
        raise HeadsurgeonError(f"every peer must be a timm model name or a timm model, got {items!r}")

    srcs: list[models.Source] = []
    for j, item in enumerate(items):
        kwargs = {**create_kwargs, **(peer_kwargs[j] if peer_kwargs else {})}
        if j == 1 and seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        with torch.random.fork_rng(devices=[], enabled=j > 0):
            if j:
                torch.manual_seed(seed + j)
            srcs.append(models.source(item, kwargs, None))
    ms = [s.model for s in srcs]
    labels = [s.name or type(s.model).__name__ for s in srcs]
    archs = [models.architecture(m) for m in ms]
    classes = [models.num_classes(m) for m in ms]
    if len(set(classes)) > 1:
        raise HeadsurgeonError("peers must share the classifier output size, but " + ", ".join(
            f"{lab} has {c}" for lab, c in zip(labels, classes)) + " classes; pass --num-classes (num_classes=)")
    size = tuple(input_size) if input_size else models.default_input_size(ms[0])
    chans = [models.default_input_size(m)[0] for m in ms]
    if len(set(chans)) > 1:
        raise HeadsurgeonError("peers must take the same input channels, but " + ", ".join(
            f"{lab} takes {c}" for lab, c in zip(labels, chans)) + " (set in_chans= for all of them)")
    levels, owns, unused = segments.cut_peers(ms, labels, size, leaf_modules, check=verify)
    peers = [Peer(architecture=a, model_args=models.model_args(m), source=s.name, pretrained_cfg=models.pretrained_cfg(m),
                  no_weight_decay=sorted(models.no_weight_decay(m)), unused=u)
             for a, m, s, u in zip(archs, ms, srcs, unused)]
    pretrained = all(s.trained is not None for s in srcs)
    spec = SplitSpec(
        **peers[0].model_dump(), peers=peers, at=[INPUT], heads=n, fanout=[n], rescale=bool(rescale),
        branch_init=branch_init or ("pretrained" if pretrained else "independent"), seed=int(seed), input_size=size,
        leaf_modules=[class_path(c) for c in leaf_modules], owns_input=owns, format=PEERS_FORMAT,
        versions={"headsurgeon": __version__, "timm": timm.__version__, "torch": torch.__version__},
    )
    tree = HeadTree(levels, spec)
    tree.train(ms[0].training)
    return tree



def default_fanout(heads: int, levels: int) -> list[int]:
    """Most balanced factorisation of ``heads`` into ``levels`` factors, smallest first."""
    if levels == 0:
        return []
    if levels == 1:
        return [heads]
    best: list[int] | None = None
    for f in range(2, heads + 1):
        if heads % f == 0:
            rest = default_fanout(heads // f, levels - 1)
            cand = sorted([f, *rest])
            if all(c > 1 for c in cand) and math.prod(cand) == heads:
                if best is None or max(cand) - min(cand) < max(best) - min(best):
                    best = cand
    if best is None:
        raise HeadsurgeonError(f"{heads} heads cannot be spread over {levels} split points with at least 2 children "
                               f"per fork; pass fanout explicitly (e.g. --fanout {','.join(['1'] * (levels - 1) + [str(heads)])})")
    return best


"""Trace a timm model into a train-mode graph and an eval-mode graph.

Tracing freezes every ``self.training`` branch (functional dropout, drop-path, the SDPA
``dropout_p``), so one graph cannot serve both modes; like torchvision's
``create_feature_extractor`` we trace twice and keep both. Leaf modules and autowrapped
functions are timm's own lists, plus the stochastic-depth modules, so that drop-path stays
a module that honours ``.train()``/``.eval()``. ``verify`` checks both graphs against the eager
model.
"""
from __future__ import annotations

import contextvars
import importlib
import inspect
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from torch import fx, nn
from torchvision.models.feature_extraction import NodePathTracer

from timm.layers import DropBlock2d, DropPath, Linear, PatchDropout, get_notrace_functions, get_notrace_modules

from .errors import HeadsurgeonError, first_line
from .modes import train_mode

# timm's Linear (nn.Linear plus a TorchScript bias cast; the classifier of MobileNetV3, GhostNet, ...) is kept
# whole like torch's own, so a head's classifier is called as a module and a hook sees its input (PCL's features)
EXTRA_LEAVES = (DropPath, DropBlock2d, PatchDropout, Linear)


def class_path(cls: type) -> str:
    """``module:QualName``, the form a spec, the CLI and recipes name leaf-module classes in."""
    return f"{cls.__module__}:{cls.__qualname__}"


def import_classes(paths: Sequence[str | type]) -> tuple[type, ...]:
    """The module classes named by :func:`class_path` strings (classes pass through), each checked."""
    out = []
    for p in paths:
        obj: Any = p if isinstance(p, type) else _import_class(p)
        if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
            name = p.__qualname__ if isinstance(p, type) else f"'{p}'"
            raise HeadsurgeonError(f"leaf module {name} is not a torch.nn.Module class; name the module class to "
                                   f"keep whole when tracing, as module:Class")
        out.append(obj)
    return tuple(out)


_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def _import_class(path: str) -> Any:
    mod, _, qual = path.partition(":")
    if not _DOTTED.fullmatch(mod) or not _DOTTED.fullmatch(qual):  # also no relative '.mod' imports
        raise HeadsurgeonError(f"leaf module '{path}' is not module:Class; name it like "
                               f"timm.models.gemma4_vit:Gemma4VitEncoder")
    try:
        obj: Any = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise HeadsurgeonError(f"cannot import leaf module class '{path}': {first_line(e)} (name it as module:Class, "
                               f"e.g. timm.models.gemma4_vit:Gemma4VitEncoder)") from None
    return obj


# The leaf-module classes the user named in this context (the CLI's --leaf-module, a recipe's
# split.leaf_modules) and whether the user trusts every spec read in it: what a spec.json read from disk
# may import (spec_classes). A context variable, so a library caller's setting ends with its block.
_ALLOWED: contextvars.ContextVar[tuple[frozenset[str], bool]] = contextvars.ContextVar(
    "headsurgeon_leaf_modules", default=(frozenset(), False))


def _path_of(p: str | type) -> str:
    return class_path(p) if isinstance(p, type) else str(p)


@contextmanager
def allow_leaf_modules(paths: Sequence[str | type] = (), trust: bool = False) -> Iterator[None]:
    """Let the specs read from disk in this block name the leaf-module classes ``paths`` (``module:Class``
    strings or classes), or, with ``trust``, any class: what ``--leaf-module`` / ``--trust-leaf-modules``
    of ``collapse`` and a recipe's ``split.leaf_modules`` do for the trees loaded under them."""
    names, trusted = _ALLOWED.get()
    token = _ALLOWED.set((names | {_path_of(p) for p in paths}, trusted or trust))
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def spec_classes(paths: Sequence[str], where: str, allowed: Sequence[str | type] = (),
                 trust: bool = False) -> tuple[type, ...]:
    """The leaf-module classes named by a spec read from disk (``where``), imported only when that is safe.

    Importing a module runs its code and a tree folder may come from anyone, so a spec's ``module:Class``
    is imported only if its module is imported already (timm's own classes, the package of a custom
    model the caller imported to register it: importing them again runs nothing new), or the user named
    it (``allowed``, :func:`allow_leaf_modules`: ``--leaf-module``, a recipe's ``split.leaf_modules``), or
    trusts the tree (``trust``, ``--trust-leaf-modules``). Anything else is refused in one line, before
    any import.
    """
    names, trusted = _ALLOWED.get()
    names = names | {_path_of(p) for p in allowed}
    if not (trust or trusted):
        for p in paths:
            if p not in names and p.partition(":")[0] not in sys.modules:
                raise HeadsurgeonError(
                    f"'{where}' names leaf module '{p}', which is not imported yet: a tree's spec may import only "
                    f"the modules you name (importing one runs its code); if you trust it, pass --leaf-module {p} "
                    f"(recipe split.leaf_modules, leaf_modules=[...]) or --trust-leaf-modules (trust_leaf_modules=True)")
    return import_classes(paths)


class HeadTracer(NodePathTracer):
    """``NodePathTracer`` with timm's leaf lists that remembers where tracing failed."""

    def __init__(self, leaf_modules: tuple[type, ...] = ()):
        super().__init__(
            leaf_modules=list(get_notrace_modules()) + list(EXTRA_LEAVES) + list(leaf_modules),
            autowrap_functions=tuple(get_notrace_functions()),
            param_shapes_constant=True,
        )

    def call_module(self, m: nn.Module, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:  # tag the innermost module once, then let it propagate
            if not hasattr(e, "_headsurgeon_module"):
                try:
                    e._headsurgeon_module = self.path_of_module(m)
                except Exception:
                    e._headsurgeon_module = type(m).__name__
            raise


@dataclass
class Traced:
    """The two graphs of one model and the dotted qualname of every node in each."""

    model: nn.Module
    train_graph: fx.Graph
    eval_graph: fx.Graph
    train_names: dict[fx.Node, str]
    eval_names: dict[fx.Node, str]


def concrete_args(model: nn.Module) -> dict[str, Any]:
    """Bind every ``forward`` argument after the input to its default.

    Otherwise ViT's ``attn_mask`` or Hiera's ``mask`` become placeholders that cross every cut.
    """
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _trace_once(model: nn.Module, name: str, leaf_modules: tuple[type, ...]) -> tuple[fx.Graph, dict]:
    tracer = HeadTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args(model) or None)
    except Exception as e:
        where = getattr(e, "_headsurgeon_module", None)
        found = where and has_module(model, where)
        cls = type(model.get_submodule(where)) if found else None
        at = f" in module '{where}' ({cls.__name__})" if cls else ""
        leaf = class_path(cls) if cls else "module:Class"
        raise HeadsurgeonError(
            f"cannot trace {name} with torch.fx{at}: {type(e).__name__}: {first_line(e, 300)} "
            f"(to keep that module whole: --leaf-module {leaf}, recipe key split.leaf_modules, or split(leaf_modules=...))"
        ) from None
    return graph, dict(tracer.node_to_qualname)


def has_module(model: nn.Module, path: str) -> bool:
    """Whether ``path`` names a submodule (fx qualnames of root-level ops such as ``getattr`` do not)."""
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def trace(model: nn.Module, name: str | None = None, leaf_modules: tuple[type, ...] = ()) -> Traced:
    """Trace ``model`` in train mode and in eval mode; the model's mode is restored."""
    name = name or type(model).__name__
    with train_mode(model):
        # Train first: LeViT/EfficientFormer cache attention biases under a key that an eval
        # trace fills with a Proxy; ``train()`` clears that cache again afterwards.
        tg, tn = _trace_once(model, name, leaf_modules)
        try:
            model.eval()
            eg, en = _trace_once(model, name, leaf_modules)
        finally:
            model.train()
    return Traced(model, tg, eg, tn, en)

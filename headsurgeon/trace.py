"""Trace a timm model into a train-mode graph and an eval-mode graph.

Tracing freezes every ``self.training`` branch (functional dropout, drop-path, the SDPA
``dropout_p``), so one graph cannot serve both modes; like torchvision's
``create_feature_extractor`` we trace twice and keep both. Leaf modules and autowrapped
functions are timm's own lists, plus the stochastic-depth modules, so that drop-path stays
a module that honours ``.train()``/``.eval()``. Both graphs are checked against the eager
model right after tracing.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torchvision.models.feature_extraction import NodePathTracer

from timm.layers import DropBlock2d, DropPath, PatchDropout, get_notrace_functions, get_notrace_modules

from .errors import HeadsurgeonError

EXTRA_LEAVES = (DropPath, DropBlock2d, PatchDropout)


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
        at = f" in module '{where}' ({type(model.get_submodule(where)).__name__})" if where and has_module(model, where) else ""
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HeadsurgeonError(
            f"cannot trace {name} with torch.fx{at}: {type(e).__name__}: {msg[:300]} "
            f"(pass leaf_modules=(ThatModuleClass,) to split() to keep it whole)"
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
    was_training = model.training
    try:
        # Train first: LeViT/EfficientFormer cache attention biases under a key that an eval
        # trace fills with a Proxy; ``train()`` clears that cache again afterwards.
        model.train()
        tg, tn = _trace_once(model, name, leaf_modules)
        model.eval()
        eg, en = _trace_once(model, name, leaf_modules)
    finally:
        model.train()
        model.train(was_training)
    return Traced(model, tg, eg, tn, en)


# --------------------------------------------------------------------------- numerical checks

def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two outputs (tensors or nested tuples/lists/dicts of them)."""
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    if len(la) != len(lb):
        return float("inf")
    worst = 0.0
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape:
                return float("inf")
            if x.numel():
                d = (x.detach().double() - y.detach().double()).abs().max().item()
                if d != d:  # NaN anywhere: never "equal"
                    return float("nan")
                worst = max(worst, d)
        elif x != y:
            return float("inf")
    return worst


def tolerance(reference: Any, atol: float = 1e-5) -> float:
    """``atol`` scaled by the output's magnitude: fp32 summation order may differ by an ulp."""
    big = max((t.detach().abs().max().item() for t in torch.utils._pytree.tree_leaves(reference)
               if isinstance(t, torch.Tensor) and t.numel() and t.is_floating_point()), default=1.0)
    return atol * max(1.0, big)


class BufferSnapshot:
    """Restore running statistics after a train-mode check so that checks leave no trace."""

    def __init__(self, *modules: nn.Module):
        self.saved = [(b, b.detach().clone()) for m in modules for b in m.buffers()]

    def restore(self) -> None:
        with torch.no_grad():
            for b, v in self.saved:
                b.copy_(v)


def run_both_modes(fn, example: torch.Tensor, *modules: nn.Module, seed: int = 0) -> dict[str, Any]:
    """Outputs of ``fn(example)`` in eval and in train mode (same RNG seed), buffers restored."""
    out = {}
    snap = BufferSnapshot(*modules)
    try:
        for mode in ("eval", "train"):
            for m in modules:
                m.train(mode == "train")
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out[mode] = fn(example)
            snap.restore()
    finally:
        snap.restore()
    return out


def check_against_eager(model: nn.Module, candidates: dict[str, tuple[Any, list[nn.Module]]],
                        example: torch.Tensor, name: str) -> None:
    """Raise if any candidate (``what -> (fn, its modules)``: a graph, a chain of segments)
    differs from eager in either mode. The eager reference is computed once for all of them."""
    was = model.training
    try:
        ref = run_both_modes(model, example, model)
        for what, (candidate, candidate_modules) in candidates.items():
            got = run_both_modes(candidate, example, model, *candidate_modules)
            for mode in ("eval", "train"):
                diff = max_abs_diff(ref[mode], got[mode])
                if not diff <= tolerance(ref[mode]):
                    raise HeadsurgeonError(
                        f"{what} of {name} differs from the eager model in {mode} mode (max abs diff {diff:.3g}); "
                        f"this model cannot be cut exactly, please report it"
                    )
    finally:
        model.train(was)

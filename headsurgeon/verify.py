"""Every numerical check: a cut, a collapsed head and an exported model must compute what they came from.

Tracing freezes ``self.training`` branches, so the cut is compared with the eager model in
both modes (train mode under one RNG seed, running statistics restored afterwards). Collapse
and export compare eval logits. Modes are switched with :mod:`headsurgeon.modes`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .errors import HeadsurgeonError, first_line
from .modes import eval_mode, probe, train_mode

EPS32 = torch.finfo(torch.float32).eps
COLLAPSE_ATOL = 1e-5  # collapsed head vs tree head, eval logits: scaled by tolerance() like the eager check


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two outputs (tensors or nested tuples/lists/dicts of them).

    Different structure or shapes give ``inf``; a NaN anywhere gives ``nan`` (never "equal").
    """
    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb):
        return float("inf")
    worst = 0.0
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape:
                return float("inf")
            if x.numel():
                d = (x.detach().double() - y.detach().double()).abs().max().item()
                if d != d:
                    return float("nan")
                worst = max(worst, d)
        elif x != y:
            return float("inf")
    return worst


def tolerance(reference: Any, atol: float = 1e-5, in_dtype: bool = False) -> float:
    """How far two evaluations of one function on one processor may differ: ``atol`` (float32, outputs of
    size 1) scaled by the largest output (at least 1) and, for a dtype coarser than float32, by its eps
    over float32's; ``in_dtype``: the whole computation runs in the output's dtype (a test's float64
    model), so a finer eps scales it down too.

    Both sides run the same ops on the same processor; only the order of a sum can differ (a kernel chosen
    by strides, alignment or thread count), which moves a result by a few ulps of the largest value in it,
    an ulp being eps times that magnitude. Logits are O(1), and one near 0 carries the rounding of the
    larger terms it sums: hence the floor of 1, not a bound relative to each element. 1e-5 is 84 float32
    ulps (1.9e-14 in float64): room for many reordered sums, where a wrong function (a frozen constant,
    another head's weights) is off by O(1). Not below float32's without ``in_dtype``: a float64 model may
    compute parts in float32 (sapiens2's RoPE tables).
    """
    leaves = [t for t in tree_leaves(reference) if isinstance(t, torch.Tensor) and t.numel() and t.is_floating_point()]
    big = max((t.detach().abs().max().item() for t in leaves), default=1.0)
    ratio = max((torch.finfo(t.dtype).eps for t in leaves), default=EPS32) / EPS32
    return atol * (ratio if in_dtype else max(1.0, ratio)) * max(1.0, big)


class BufferSnapshot:
    """Restore running statistics after a train-mode check so that checks leave no trace."""

    def __init__(self, *modules: nn.Module):
        self.saved = [(b, b.detach().clone()) for m in modules for b in m.buffers()]

    def restore(self) -> None:
        with torch.no_grad():
            for b, v in self.saved:
                b.copy_(v)


def run_both_modes(fn: Callable[[torch.Tensor], Any], example: torch.Tensor, *modules: nn.Module,
                   seed: int = 0) -> dict[str, Any]:
    """Outputs of ``fn(example)`` in eval and in train mode (same RNG seed); buffers and modes restored."""
    out = {}
    snap = BufferSnapshot(*modules)
    try:
        for mode in ("eval", "train"):
            switch = train_mode if mode == "train" else eval_mode
            with switch(*modules), torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out[mode] = fn(example)
            snap.restore()
    finally:
        snap.restore()
    return out


def check_against_eager(model: nn.Module, candidates: Mapping[str, tuple[Callable, list[nn.Module]]],
                        example: torch.Tensor, name: str) -> None:
    """Raise if any candidate (``what -> (fn, its modules)``: a graph, a chain of segments)
    differs from eager in either mode. The eager reference is computed once for all of them."""
    try:
        ref = run_both_modes(model, example, model)
    except Exception as e:  # the model itself refuses this input (a ViT's patch size, the channels it was made for)
        raise input_error(model, name, example.shape[1:], e) from None
    for what, (candidate, candidate_modules) in candidates.items():
        got = run_both_modes(candidate, example, model, *candidate_modules)
        for mode in ("eval", "train"):
            diff = max_abs_diff(ref[mode], got[mode])
            if not diff <= tolerance(ref[mode]):
                raise HeadsurgeonError(
                    f"{what} of {name} differs from the eager model in {mode} mode (max abs diff {diff:.3g}); "
                    f"this model cannot be cut exactly, please report it"
                )


def input_error(model: nn.Module, name: str, size: Any, e: Exception) -> HeadsurgeonError:
    """``model`` cannot run on inputs of ``size`` (C, H, W), as one line naming the size it was made for."""
    from .models import default_input_size

    try:
        own = f" (its own: {'x'.join(map(str, default_input_size(model)))})"
    except Exception:
        own = ""
    return HeadsurgeonError(f"{name} cannot run on input size {'x'.join(map(str, size))} ({type(e).__name__}: "
                            f"{first_line(e)}); give an input size it accepts{own}: --input-size C,H,W, or "
                            f"data.img_size in a recipe")


def check_collapsed(tree: nn.Module, head: int, model: nn.Module, x: torch.Tensor, atol: float = COLLAPSE_ATOL) -> None:
    """The collapsed ``model``'s eval logits must equal head ``head`` of ``tree`` within :func:`tolerance`
    (``atol`` at float32 and logits of size 1)."""
    with eval_mode(tree, model), torch.no_grad():
        want = tree(x)[head]
        diff = max_abs_diff(want, model(x))
    bound = tolerance(want, atol)  # relative to the logits: an absolute 1e-5 is 2 ulps at |z| = 40
    if not diff <= bound:
        raise HeadsurgeonError(f"collapsed head {head} differs from the tree by {diff:.3g} (> {bound:.3g}); "
                               "please report this")


def check_reload(model: nn.Module, directory: Path) -> None:
    """``timm.create_model('local-dir:DIR', pretrained=True)`` must give exactly ``model``'s eval logits."""
    import timm

    from .models import default_input_size

    p = next(iter(model.parameters()))
    reloaded = timm.create_model(f"local-dir:{Path(directory).resolve()}", pretrained=True).to(p.device, p.dtype).eval()
    x = probe(default_input_size(model), 7, model)
    with eval_mode(model), torch.no_grad():
        diff = max_abs_diff(model(x), reloaded(x))
    # exact: the same class with the same weights on the same input, in this process: the same kernels
    if not diff == 0.0:
        raise HeadsurgeonError(f"the exported model reloads with different logits (max abs diff {diff:.3g}); please report this")

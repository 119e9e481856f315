"""Collapse one root-to-leaf path of a head tree back into the original timm model, and export it.

The segments keep every submodule at its original dotted path, so the union of the
state dicts on one path *is* the timm state dict: it is loaded with ``strict=True`` into a
fresh ``timm.create_model(architecture, **model_args)`` and the logits are checked against
the tree's head before anything is returned or written.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import timm
import torch
from torch import nn

from .errors import HeadsurgeonError
from .trace import max_abs_diff
from .tree import HeadTree, _atomic_dir, _create

ATOL = 1e-5


def _probe(spec: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    size = spec.get("input_size") or [3, 224, 224]
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(1234))
    return x.to(device=device, dtype=dtype)


def collapse(tree: HeadTree, head: int, probe: torch.Tensor | None = None, atol: float = ATOL) -> nn.Module:
    """Return head ``head`` of ``tree`` as a plain timm model, verified against the tree.

    Raises ``HeadsurgeonError`` if the strict load fails or if the collapsed model's eval logits
    differ from the tree head's by more than ``atol`` (fp32) on a probe batch.
    """
    spec = tree.spec
    path = tree.path(head)  # validates the index
    model = _create(spec["architecture"], dict(spec["model_args"]))
    if spec.get("pretrained_cfg"):
        model.pretrained_cfg = model.default_cfg = dict(spec["pretrained_cfg"])
    sd = tree.head_state_dict(head)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise HeadsurgeonError(f"head {head} (path {path}) does not load into {spec['architecture']}: "
                               f"{str(e).splitlines()[1 if len(str(e).splitlines()) > 1 else 0][:300]}") from None
    p = next(iter(tree.parameters()))
    model.to(device=p.device, dtype=p.dtype)
    x = probe if probe is not None else _probe(spec, p.device, p.dtype)
    was = tree.training
    tree.eval()
    model.eval()
    try:
        with torch.no_grad():
            want = tree(x)[head]
            got = model(x)
    finally:
        tree.train(was)
    diff = max_abs_diff(want, got)
    if not diff <= atol:
        raise HeadsurgeonError(f"collapsed head {head} differs from the tree by {diff:.3g} (> {atol}); please report this")
    return model


def export(model: nn.Module, directory: str | os.PathLike, label_names: Sequence[str] | None = None,
           overwrite: bool = False, verify: bool = True,
           card: str | Callable[[Path], str] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` with timm's ``save_for_hf``.

    ``timm.create_model('local-dir:DIR', pretrained=True)`` rebuilds the model in a process that
    never imports headsurgeon; that reload is checked against ``model`` before the directory
    appears (it is written atomically). ``card`` is the model card (``README.md``): its text, or a
    function of the written, verified directory that returns it (see ``headsurgeon.card``).
    """
    from timm.models import save_for_hf

    directory = Path(directory)
    model_config = {"label_names": list(label_names)} if label_names else None
    with _atomic_dir(directory, overwrite) as tmp:
        save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True)
        if verify:
            _check_reload(model, tmp)
        if card is not None:
            (tmp / "README.md").write_text(card(tmp) if callable(card) else card, encoding="utf-8")
    return directory


def _check_reload(model: nn.Module, directory: Path) -> None:
    p = next(iter(model.parameters()))
    reloaded = timm.create_model(f"local-dir:{directory.resolve()}", pretrained=True).to(p.device, p.dtype).eval()
    was = model.training
    model.eval()
    try:
        from .tree import default_input_size

        x = torch.randn(2, *default_input_size(model), generator=torch.Generator().manual_seed(7)).to(p.device, p.dtype)
        with torch.no_grad():
            diff = max_abs_diff(model(x), reloaded(x))
    finally:
        model.train(was)
    if not diff == 0.0:
        raise HeadsurgeonError(f"the exported model reloads with different logits (max abs diff {diff:.3g}); please report this")

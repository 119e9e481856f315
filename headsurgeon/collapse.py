"""Collapse one root-to-leaf path of a head tree back into the original timm model, and export it.

The segments keep every submodule at its original dotted path, so the union of the
state dicts on one path *is* the timm state dict: it is loaded with ``strict=True`` into a
fresh ``timm.create_model(architecture, **model_args)`` and the logits are checked against
the tree's head before anything is returned or written.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .storage import atomic_dir
from .tree import HeadTree
from .verify import COLLAPSE_ATOL, check_reload

ATOL = COLLAPSE_ATOL


def collapse(tree: HeadTree, head: int, probe: torch.Tensor | None = None, atol: float = ATOL) -> nn.Module:
    """Return head ``head`` of ``tree`` as a plain timm model, verified against the tree.

    The functional form of :meth:`HeadTree.collapse`. Raises ``HeadsurgeonError`` if the strict
    load fails or if the collapsed model's eval logits differ from the tree head's by more than
    ``atol`` (fp32) on a probe batch.
    """
    return tree.collapse(head, probe=probe, atol=atol)


def export(model: nn.Module, directory: str | os.PathLike, label_names: Sequence[str] | None = None,
           overwrite: bool = False, verify: bool = True,
           card: str | Callable[[Path], str] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` with timm's ``save_for_hf``.

    ``timm.create_model('local-dir:DIR', pretrained=True)`` rebuilds the model in a process that
    never imports headsurgeon; that reload is checked against ``model`` before the directory
    appears (it is written atomically).

    Args:
        model: a timm model (e.g. from :func:`collapse`).
        directory: must be new or empty unless ``overwrite``.
        label_names: class names, stored in ``config.json``.
        overwrite: replace a non-empty directory.
        verify: reload the written files with timm and require identical logits.
        card: the model card (``README.md``): its text, or a function of the written, verified
            directory that returns it (see ``headsurgeon.card.card_writer``).
    """
    from timm.models import save_for_hf

    directory = Path(directory)
    model_config = {"label_names": list(label_names)} if label_names else None
    with atomic_dir(directory, overwrite) as tmp:
        save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True)
        if verify:
            check_reload(model, tmp)
        if card is not None:
            (tmp / "README.md").write_text(card(tmp) if callable(card) else card, encoding="utf-8")
    return directory

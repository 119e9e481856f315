"""Collapse one root-to-leaf path of a head tree back into the original timm model, and export it.

The segments keep every submodule at its original dotted path, so the union of the
state dicts on one path *is* the timm state dict: it is loaded with ``strict=True`` into a
fresh ``timm.create_model(architecture, **model_args)`` and the logits are checked against
the tree's head before anything is returned or written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import timm
import torch
from torch import nn

from .errors import HeadsurgeonError
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
           card: str | Callable[[Path], str] | None = None,
           data_config: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` with timm's ``save_for_hf`` (``num_classes`` top-level
    only, see :func:`hub_config`).

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
        data_config: the evaluation preprocessing the weights were trained for (``input_size``,
            ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``; see
            ``headsurgeon.data.eval_config``), written into ``config.json``'s ``pretrained_cfg`` in
            place of the base model's (its ``test_input_size``/``test_crop_pct`` dropped), so that
            ``timm.data.resolve_data_config(model=m)`` + ``create_transform(**cfg)`` reproduce it.
            None keeps the model's own ``pretrained_cfg``.
    """
    from timm.models import save_for_hf

    directory = Path(directory)
    if isinstance(label_names, (str, bytes)):  # list("cat") would be three classes 'c', 'a', 't'
        raise HeadsurgeonError(f"label_names is the string {label_names!r}; give one name per class, e.g. "
                               f"label_names=['cat', 'dog']")
    model_config = {"label_names": list(label_names)} if label_names else None
    own = getattr(model, "pretrained_cfg", None)
    with atomic_dir(directory, overwrite) as tmp:
        if data_config:  # save_for_hf writes model.pretrained_cfg: swap in the run's, put the model's back after
            model.pretrained_cfg = model.default_cfg = with_data_config(own or {}, data_config)
        try:
            save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True)
        finally:
            if data_config:
                model.pretrained_cfg = model.default_cfg = own
        hub_config(tmp / "config.json")
        if data_config:
            check_data_config(tmp, data_config)
        if verify:
            check_reload(model, tmp)
        if card is not None:
            (tmp / "README.md").write_text(card(tmp) if callable(card) else card, encoding="utf-8")
    return directory


def hub_config(path: Path) -> None:
    """Keep ``num_classes`` top-level only, as the Hub's timm configs do.

    timm >= 1.0.31 also writes it into ``model_args``, and transformers (the Hub's loader for timm
    models) calls ``create_model(arch, num_classes=num_labels, **model_args)``: a TypeError.
    timm itself reads the top-level value (into ``pretrained_cfg``), so the reload is unchanged.
    """
    cfg = json.loads(path.read_text())
    args = cfg.get("model_args")
    if not isinstance(args, dict) or "num_classes" not in args:
        return
    if args["num_classes"] != cfg.get("num_classes"):
        raise HeadsurgeonError(f"timm {timm.__version__} wrote config.json with num_classes {cfg.get('num_classes')} "
                               f"but model_args num_classes {args['num_classes']}; please report this")
    del args["num_classes"]
    if not args:
        del cfg["model_args"]
    with path.open("w") as f:
        json.dump(cfg, f, indent=2)  # as save_for_hf writes it


def with_data_config(pretrained_cfg: dict[str, Any], data_config: dict[str, Any]) -> dict[str, Any]:
    """``pretrained_cfg`` evaluated as ``data_config`` says: the base model's test-time size and crop
    (ImageNet's, say) would otherwise win over it in ``resolve_data_config(use_test_size=True)``."""
    cfg = {k: v for k, v in pretrained_cfg.items() if k not in ("test_input_size", "test_crop_pct", "test_pool_size")}
    if tuple(cfg.get("input_size", ())[1:]) != tuple(data_config["input_size"][1:]):
        cfg.pop("pool_size", None)  # the feature map size at the base model's input size
    cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()})
    return cfg


def check_data_config(directory: Path, data_config: dict[str, Any]) -> None:
    """The written ``config.json`` must carry ``data_config`` (timm versions differ in what they rewrite)."""
    cfg = json.loads((directory / "config.json").read_text()).get("pretrained_cfg", {})
    plain = json.loads(json.dumps(data_config))  # tuples as lists, as config.json holds them
    bad = [k for k, v in plain.items() if cfg.get(k) != v]
    if cfg.get("test_input_size") not in (None, plain.get("input_size")):
        bad.append("test_input_size")
    if bad:
        raise HeadsurgeonError(f"timm {timm.__version__} wrote config.json without the run's preprocessing "
                               f"({', '.join(bad)}: {[cfg.get(k) for k in bad]}); please report this")

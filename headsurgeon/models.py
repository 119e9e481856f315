"""The timm side: create a model from a name or a spec's peer, load weights, read what a spec records.

Everything here speaks timm's language (``timm.create_model`` names including ``local-dir:``
and ``hf-hub:``, ``pretrained_cfg``, ``_model_args``) and turns timm's failures into one-line
:class:`HeadsurgeonError` messages. :func:`model_from_peer` is the one place a tree's model is
rebuilt: ``HeadTree.load`` and ``collapse`` both call it.
"""
from __future__ import annotations

import copy
import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
from torch import nn

from .errors import HeadsurgeonError, first_line

if TYPE_CHECKING:
    from .spec import Peer

# create_model kwargs that say where weights come from, not what the architecture is
CREATE_ONLY = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
               "device", "dtype")


def create(name: str, kwargs: dict[str, Any] | None = None, pretrained: bool = False) -> nn.Module:
    """``timm.create_model`` with its failures turned into one-line errors (with a did-you-mean)."""
    kwargs = kwargs or {}
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            near = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(near)}?" if near else "; see timm.list_models()"
            raise HeadsurgeonError(f"unknown timm model '{name}'{hint}") from None
        raise HeadsurgeonError(f"cannot create '{name}': {first_line(e, 300)}") from None
    except TypeError as e:
        raise HeadsurgeonError(f"cannot create '{name}' with {kwargs}: {first_line(e, 300)}") from None
    except (OSError, ValueError) as e:
        first = first_line(e).split(". ")[0]
        if pretrained:
            raise HeadsurgeonError(
                f"cannot download or read the pretrained weights of '{name}' ({type(e).__name__}: {first}); "
                f"offline? pass --weights FILE (weights=FILE) with a local safetensors or timm checkpoint"
            ) from None
        raise HeadsurgeonError(f"cannot create '{name}': {type(e).__name__}: {first}") from None
    # timm's encoder-only models (e.g. qwen3_vit_*_enc) accept and ignore num_classes: their output is
    # tokens, not logits, so there is no classifier to fork into heads
    if kwargs.get("num_classes") and getattr(model, "num_classes", None) == 0:
        raise HeadsurgeonError(f"'{name}' is an encoder without a classifier (it ignores num_classes="
                               f"{kwargs['num_classes']}); headsurgeon forks classifier heads: choose a classification model")
    return model


def model_from_peer(peer: Peer) -> nn.Module:
    """A fresh ``timm.create_model(architecture, **model_args)`` of one head's model (``spec.peer(head)``:
    the same for every head unless the tree has heterogeneous peers), carrying its ``pretrained_cfg``."""
    # a spec may come from anyone: it names a registered architecture (split records one), never a source
    # that makes timm read or download something (hf-hub:, local-dir:, checkpoint_path, a pretrained_cfg overlay)
    where = set(peer.model_args) & set(CREATE_ONLY)
    if ":" in peer.architecture or where:
        what = f"model_args {sorted(where)}" if where else f"architecture '{peer.architecture}'"
        raise HeadsurgeonError(f"the tree's spec names {what}, which `headsurgeon split` never writes (a spec names "
                               f"a registered timm architecture and its kwargs); re-create the tree")
    model = create(peer.architecture, dict(peer.model_args))
    if peer.pretrained_cfg:
        model.pretrained_cfg = model.default_cfg = dict(peer.pretrained_cfg)
    return model


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier named by ``pretrained_cfg['classifier']``."""
    cls = model.pretrained_cfg.get("classifier") or ()
    cls = (cls,) if isinstance(cls, str) else tuple(cls)
    return {k for k in model.state_dict() if any(k == c or k.startswith(c + ".") for c in cls)}


def load_weights(model: nn.Module, path: str | os.PathLike) -> set[str]:
    """Load a local safetensors or timm checkpoint; returns the keys it set.

    Classifier weights of a different shape (a new ``num_classes``) are left to initialise.
    """
    from timm.models import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise HeadsurgeonError(f"weights file '{path}' does not exist")
    try:
        sd = load_state_dict(str(path), weights_only=True)
    except Exception as e:
        raise HeadsurgeonError(f"cannot read weights file '{path}' ({first_line(e)}); give a safetensors file or a "
                               f"timm/PyTorch checkpoint (.pth, .pt, .bin)") from None
    own = model.state_dict()
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in sd if k in own and sd[k].shape != own[k].shape)
    classifier = classifier_keys(model)
    if unexpected or set(wrong) - classifier:
        bad = (unexpected + [k for k in wrong if k not in classifier])[:4]
        raise HeadsurgeonError(f"weights file '{path}' does not fit {model.pretrained_cfg.get('architecture')}: "
                               f"unexpected or mis-shaped keys {bad}")
    sd = {k: v for k, v in sd.items() if k not in wrong}
    model.load_state_dict(sd, strict=False)
    return set(sd)


@dataclass
class Source:
    """The model to split, its timm name (None for a module) and the keys holding meaningful
    (pretrained) weights (None: everything is a random initialisation)."""

    model: nn.Module
    name: str | None
    trained: set[str] | None


def source(model: str | nn.Module, create_kwargs: dict[str, Any], weights: str | os.PathLike | None) -> Source:
    """Create (or copy, never mutating the caller's module) the model ``split`` starts from."""
    create_kwargs = dict(create_kwargs)
    if isinstance(model, nn.Module):
        if create_kwargs:
            raise HeadsurgeonError("create_kwargs only apply when split() is given a model name, not a module")
        m, name = copy.deepcopy(model), None
        trained: set[str] | None = set(m.state_dict())
    else:
        pretrained = bool(create_kwargs.pop("pretrained", False))
        m, name, trained = create(model, create_kwargs, pretrained=pretrained), model, None
        if pretrained:
            trained = set(m.state_dict())
            if create_kwargs.get("num_classes") not in (None, m.pretrained_cfg.get("num_classes")):
                trained -= classifier_keys(m)
    if weights is not None:
        trained = (trained or set()) | load_weights(m, weights)
    return Source(m, name, trained)


def architecture(m: nn.Module) -> str:
    """The registered timm architecture ``m`` was created as; collapse rebuilds exactly this."""
    cfg = getattr(m, "pretrained_cfg", None) or getattr(m, "default_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch or not timm.is_model(arch):
        raise HeadsurgeonError(f"{type(m).__name__} is not a timm model (no registered architecture in pretrained_cfg); "
                               f"create it with timm.create_model")
    return arch


def model_args(m: nn.Module) -> dict[str, Any]:
    """The architecture kwargs ``m`` was created with (``num_classes``, ``img_size``, ...), JSON-checked."""
    args = {k: v for k, v in getattr(m, "_model_args", {}).items() if k not in CREATE_ONLY}
    bad = [k for k, v in args.items() if not _is_json(v)]
    if bad:
        raise HeadsurgeonError(f"model kwargs {bad} are not JSON-serialisable; pass them as names or numbers")
    return args


def pretrained_cfg(m: nn.Module) -> dict[str, Any]:
    """``m.pretrained_cfg`` as JSON (tuples become lists, anything else its ``str``)."""
    cfg = dict(getattr(m, "pretrained_cfg", {}) or {})
    return json.loads(json.dumps(cfg, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def no_weight_decay(m: nn.Module) -> set[str]:
    """Parameter names the model asks timm's optimizer not to decay (prefixes expanded)."""
    fn = getattr(m, "no_weight_decay", None)
    if not callable(fn):
        return set()
    names = set(fn())
    return {n for n, _ in m.named_parameters() if n in names or any(n.startswith(p + ".") for p in names)}


def num_classes(m: nn.Module) -> int | None:
    """The classifier's output size (timm models say so in ``num_classes``)."""
    n = getattr(m, "num_classes", None)
    return n if isinstance(n, int) else (getattr(m, "pretrained_cfg", None) or {}).get("num_classes")


def default_input_size(m: nn.Module) -> tuple[int, ...]:
    """The model's own input size, including ``img_size=`` given at creation."""
    try:
        from timm.models._input import get_model_input_config  # timm's own private helper; absent in older timm

        return tuple(get_model_input_config(m)["input_size"])
    except Exception:
        return tuple(m.pretrained_cfg.get("input_size", (3, 224, 224)))


def _is_json(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False

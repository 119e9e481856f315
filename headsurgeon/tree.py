"""Build a tree of classifier heads from a traced, cut timm model.

Level 0 is the trunk; level ``l`` holds ``prod(fanout[:l])`` copies of segment ``l``, and
copy ``j`` feeds on the output of copy ``j // fanout[l-1]`` of the level above. Every
segment is an ``fx.GraphModule`` whose submodules sit at their original dotted paths, so
parameter names end with the timm name (``levels.1.0.layer3.0.conv1.weight``) and the
weights of one root-to-leaf path load into the original timm class unchanged.
"""
from __future__ import annotations

import copy
import importlib
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import safetensors.torch
import timm
import torch
from torch import fx, nn
from torch.utils._pytree import tree_map_only
from torchvision.models.feature_extraction import DualGraphModule

from . import __version__
from .cut import INPUT, cut_graph, feature_points, point_names, resolve_all
from .errors import HeadsurgeonError
from .trace import Traced, check_against_eager, max_abs_diff, run_both_modes, trace

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "tree.safetensors"
FORMAT = 1
BRANCH_INITS = ("independent", "copy")


# ------------------------------------------------------------------------------- the fork op

class _Fork(torch.autograd.Function):
    """Identity forward; gradient x ``scale`` backward (the paper's operation I, eq. 5).

    ``own=True`` hands the child a copy: a branch that starts with an in-place op (VGG's
    ReLU, Xception) would otherwise overwrite its siblings' input.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float, own: bool) -> torch.Tensor:
        ctx.scale = scale
        return x.clone() if own else x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None, None


def fork(values: Any, scale: float, own: bool) -> Any:
    """Apply the fork op to every tensor in ``values`` (a tuple of values crossing a cut)."""

    def one(t: torch.Tensor) -> torch.Tensor:
        if t.requires_grad and (scale != 1.0 or own):
            return _Fork.apply(t, scale, own)
        return t.clone() if own else t

    return tree_map_only(torch.Tensor, one, values)


# ------------------------------------------------------------------------------- the module

class HeadTree(nn.Module):
    """A timm model split into a tree of heads; ``forward`` returns one logits tensor per head."""

    def __init__(self, levels: Sequence[Sequence[nn.Module]], fanout: Sequence[int], rescale: bool,
                 owns_input: Sequence[bool], spec: dict[str, Any]):
        super().__init__()
        self.levels = nn.ModuleList(nn.ModuleList(segs) for segs in levels)
        self.fanout = list(fanout)
        self.rescale = rescale
        self.owns_input = list(owns_input)  # per level: does segment l mutate its inputs?
        self.spec = spec

    @property
    def num_heads(self) -> int:
        return len(self.levels[-1])

    def path(self, head: int) -> list[int]:
        """Index of the segment copy at each level on the way from the trunk to ``head``."""
        if not 0 <= head < self.num_heads:
            raise HeadsurgeonError(f"head {head} does not exist; this tree has heads 0..{self.num_heads - 1}")
        idx, out = head, []
        for level in reversed(range(len(self.levels))):
            out.append(idx)
            if level:
                idx //= self.fanout[level - 1]
        return out[::-1]

    def forward(self, x: torch.Tensor) -> list[Any]:
        outs = [self.levels[0][0](x)]
        for level in range(1, len(self.levels)):
            f = self.fanout[level - 1]
            scale = 1.0 / f if self.rescale else 1.0
            own = self.owns_input[level] and f > 1
            outs = [seg(*fork(outs[j // f], scale, own)) for j, seg in enumerate(self.levels[level])]
        return outs

    def segments(self, head: int) -> list[nn.Module]:
        return [self.levels[level][i] for level, i in enumerate(self.path(head))]

    def head_state_dict(self, head: int) -> dict[str, torch.Tensor]:
        """The original timm ``state_dict`` of one root-to-leaf path."""
        sd: dict[str, torch.Tensor] = {}
        for seg in self.segments(head):
            sd.update(seg.state_dict())
        return sd

    @property
    def has_unused_parameters(self) -> bool:
        """True when the model registers weights its forward never reads (DDP must be told)."""
        return bool(self.spec.get("unused"))

    def no_weight_decay(self) -> set[str]:
        """Tree names of the source model's no-weight-decay parameters (read by timm's optimizer)."""
        base = set(self.spec.get("no_weight_decay", []))
        return {n for n, _ in self.named_parameters() if _original_name(n) in base}

    def run_head(self, head: int, x: torch.Tensor) -> Any:
        """Forward through one root-to-leaf path only (what a collapsed model computes)."""
        segs = self.segments(head)
        vals = segs[0](x)
        for seg in segs[1:]:
            vals = seg(*vals)
        return vals

    def cost(self, input_size: Sequence[int] | None = None) -> dict[str, int]:
        """Parameters and FLOPs per image of the tree and of one head (= the base model)."""
        from .points import count_flops

        p = next(iter(self.parameters()))
        x = torch.zeros(1, *(input_size or self.spec["input_size"]), device=p.device, dtype=p.dtype)
        was = self.training
        self.eval()
        try:
            flops = {"tree_flops": count_flops(self, x), "base_flops": count_flops(lambda t: self.run_head(0, t), x)}
        finally:
            self.train(was)
        base = {id(t): t.numel() for seg in self.segments(0) for t in seg.parameters()}
        return {"tree_params": sum(t.numel() for t in self.parameters()), "base_params": sum(base.values()), **flops}

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, at={self.spec.get('at')}, fanout={self.fanout}, rescale={self.rescale}"

    def describe(self) -> str:
        """Which segments each head owns, one line per level."""
        at = self.spec["at"]
        bounds = ["input", *at, "output"]
        lines = []
        for level, segs in enumerate(self.levels):
            span = f"{bounds[level]} -> {bounds[level + 1]}" if level else f"input -> {bounds[1]}"
            per = f"shared by {self.num_heads // len(segs)} heads" if len(segs) < self.num_heads else "one per head"
            lines.append(f"level {level}: {len(segs)} x [{span}] ({per})")
        return "\n".join(lines)

    # ---------------------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``spec.json`` and ``tree.safetensors`` atomically (no pickle)."""
        directory = Path(directory)
        with _atomic_dir(directory, overwrite) as tmp:
            safetensors.torch.save_model(self, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            (tmp / SPEC_FILE).write_text(json.dumps(self.spec, indent=2, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "HeadTree":
        """Rebuild the tree from its spec (re-tracing the timm model) and load its weights."""
        directory = Path(directory)
        spec_path, weights = directory / SPEC_FILE, directory / WEIGHTS_FILE
        if not spec_path.is_file() or not weights.is_file():
            raise HeadsurgeonError(
                f"'{directory}' is not a head tree directory (needs {SPEC_FILE} and {WEIGHTS_FILE}); "
                f"create one with `headsurgeon split`"
            )
        try:
            spec = json.loads(spec_path.read_text())
            arch, model_args = spec["architecture"], dict(spec["model_args"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HeadsurgeonError(f"'{spec_path}' is unreadable ({type(e).__name__}: {e}); re-create the tree") from None
        if spec.get("format", 0) > FORMAT:
            raise HeadsurgeonError(f"'{directory}' was written by a newer headsurgeon (format {spec['format']}); upgrade")
        model = _create(arch, model_args)
        if spec.get("pretrained_cfg"):
            model.pretrained_cfg = model.default_cfg = dict(spec["pretrained_cfg"])
        tree = split(model, spec["at"], spec["heads"], spec["fanout"], spec["rescale"], branch_init="copy",
                     input_size=spec.get("input_size"), leaf_modules=_import_all(spec.get("leaf_modules", [])),
                     _quiet=True)
        try:
            missing, unexpected = safetensors.torch.load_model(tree, str(weights), strict=True, device=str(device))
        except Exception as e:
            raise HeadsurgeonError(f"weights in '{weights}' do not fit the tree in its spec: {str(e).splitlines()[0][:300]}") from None
        tree.spec = spec
        return tree.to(device)


def _original_name(tree_name: str) -> str:
    """``levels.1.0.layer3.0.conv1.weight`` -> ``layer3.0.conv1.weight``."""
    return tree_name.split(".", 3)[3]


def check_output(target: Path, overwrite: bool) -> None:
    """Refuse an output that cannot be written; callers run it before work, the write again."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise HeadsurgeonError(f"output '{target}' exists and is not a directory; choose another -o")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise HeadsurgeonError(f"output directory '{target}' is not empty; pass --overwrite or choose another -o")


class _atomic_dir:
    """Write into a sibling temp dir and rename it into place, so nothing is half-written."""

    def __init__(self, target: Path, overwrite: bool):
        self.target, self.overwrite = Path(target), overwrite

    def __enter__(self) -> Path:
        check_output(self.target, self.overwrite)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        os.chmod(self.tmp, 0o755)
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.target, old)
            os.replace(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.target)


# ------------------------------------------------------------------------------- model source

_CREATE_ONLY = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                "device", "dtype")


def _create(name: str, kwargs: dict[str, Any], pretrained: bool = False) -> nn.Module:
    """``timm.create_model`` with its failures turned into one-line errors."""
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            import difflib

            near = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(near)}?" if near else "; see timm.list_models()"
            raise HeadsurgeonError(f"unknown timm model '{name}'{hint}") from None
        raise HeadsurgeonError(f"cannot create '{name}': {str(e).splitlines()[0][:300]}") from None
    except TypeError as e:
        raise HeadsurgeonError(f"cannot create '{name}' with {kwargs}: {e}") from None
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0].split(". ")[0][:200] if str(e).strip() else ""
        if pretrained:
            raise HeadsurgeonError(
                f"cannot download or read the pretrained weights of '{name}' ({type(e).__name__}: {first}); "
                f"offline? pass --weights FILE (weights=FILE) with a local safetensors or timm checkpoint"
            ) from None
        raise HeadsurgeonError(f"cannot create '{name}': {type(e).__name__}: {first}") from None


def _classifier_keys(model: nn.Module) -> set[str]:
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
        raise HeadsurgeonError(f"cannot read weights file '{path}': {str(e).splitlines()[0][:200]}") from None
    own = model.state_dict()
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in sd if k in own and sd[k].shape != own[k].shape)
    classifier = _classifier_keys(model)
    if unexpected or set(wrong) - classifier:
        bad = (unexpected + [k for k in wrong if k not in classifier])[:4]
        raise HeadsurgeonError(f"weights file '{path}' does not fit {model.pretrained_cfg.get('architecture')}: "
                               f"unexpected or mis-shaped keys {bad}")
    sd = {k: v for k, v in sd.items() if k not in wrong}
    model.load_state_dict(sd, strict=False)
    return set(sd)


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _source(model: str | nn.Module, create_kwargs: dict[str, Any], weights: str | None
            ) -> tuple[nn.Module, str | None, set[str] | None]:
    """The model, its name, and the keys holding meaningful (pretrained) weights (None: random init)."""
    if isinstance(model, nn.Module):
        if create_kwargs:
            raise HeadsurgeonError("create_kwargs only apply when split() is given a model name, not a module")
        m = copy.deepcopy(model)  # never mutate the caller's model
        trained = set(m.state_dict())
        name = None
    else:
        pretrained = bool(create_kwargs.pop("pretrained", False))
        m = _create(model, create_kwargs, pretrained=pretrained)
        name = model
        trained = None
        if pretrained:
            trained = set(m.state_dict())
            if create_kwargs.get("num_classes") not in (None, m.pretrained_cfg.get("num_classes")):
                trained -= _classifier_keys(m)
    if weights is not None:
        trained = (trained or set()) | load_weights(m, weights)
    return m, name, trained


def _architecture(m: nn.Module) -> str:
    cfg = getattr(m, "pretrained_cfg", None) or getattr(m, "default_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch or not timm.is_model(arch):
        raise HeadsurgeonError(f"{type(m).__name__} is not a timm model (no registered architecture in pretrained_cfg); "
                               f"create it with timm.create_model")
    return arch


def _model_args(m: nn.Module) -> dict[str, Any]:
    args = {k: v for k, v in getattr(m, "_model_args", {}).items() if k not in _CREATE_ONLY}
    try:
        json.dumps(args)
    except TypeError:
        bad = [k for k, v in args.items() if not _is_json(v)]
        raise HeadsurgeonError(f"model kwargs {bad} are not JSON-serialisable; pass them as names or numbers") from None
    return args


def _is_json(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def _import_all(paths: Sequence[str]) -> tuple[type, ...]:
    out = []
    for p in paths:
        mod, _, qual = p.partition(":")
        obj = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
        out.append(obj)
    return tuple(out)


def default_input_size(m: nn.Module) -> tuple[int, int, int]:
    """The model's own input size, including ``img_size=`` given at creation."""
    try:
        from timm.models._input import get_model_input_config

        return tuple(get_model_input_config(m)["input_size"])
    except Exception:  # older timm
        return tuple(m.pretrained_cfg.get("input_size", (3, 224, 224)))


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


# ------------------------------------------------------------------------------- split

def _segment(root: nn.Module, tg: fx.Graph, eg: fx.Graph) -> fx.GraphModule:
    same = tg.python_code(root_module="self").src == eg.python_code(root_module="self").src
    if same:
        return fx.GraphModule(root, tg, class_name="Segment")
    return DualGraphModule(root, tg, eg, class_name="Segment")


def _tensor_owner(seg: nn.Module) -> dict[int, torch.Tensor]:
    return {id(t): t for t in [*seg.parameters(), *seg.buffers()]}


def _fix_keys(segs: list[fx.GraphModule], model: nn.Module) -> list[str]:
    """Keep trace-time constants out of the weights and unused weights in the trunk.

    fx stores tensor constants as ``_tensor_constantN`` buffers (extra keys that would break a
    strict reload); parameters no node reads would be missing from a collapsed model.
    """
    from torch.fx.graph_module import _copy_attr

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
    got = [set(s.state_dict()) for s in segs]
    union = set().union(*got)
    if union != set(own):
        raise HeadsurgeonError(f"internal: segment keys {sorted(union ^ set(own))[:5]} do not match the model")
    return unused


def _probe_chain(segs: list[nn.Module], x: torch.Tensor, mutated: list[bool]) -> Any:
    """Run segments in sequence; note which segment modifies a value it was given in place."""
    vals: Any = segs[0](x)
    for s in range(1, len(segs)):
        ins = [t for t in torch.utils._pytree.tree_leaves(vals) if isinstance(t, torch.Tensor)]
        before = [t._version for t in ins]
        vals = segs[s](*vals)
        mutated[s] |= any(t._version != v for t, v in zip(ins, before))
    return vals


def split(model: str | nn.Module, at: Sequence[str] | str = (), heads: int = 1, fanout: Sequence[int] | None = None,
          rescale: bool = True, branch_init: str | None = None, *, weights: str | os.PathLike | None = None,
          seed: int | None = None, input_size: Sequence[int] | None = None, verify: bool = True,
          leaf_modules: tuple[type, ...] = (), _quiet: bool = False, **create_kwargs: Any) -> HeadTree:
    """Split a timm model into a tree of ``heads`` classifier heads.

    Args:
        model: a timm name (``resnet50``, ``local-dir:DIR``, ``hf-hub:user/repo``) or a timm model.
        at: split points in forward order (module paths like ``layer3``/``blocks.8``, fx node
            names, or ``"input"`` for independent instances). Each is the first part every branch owns.
        heads: number of leaves. ``fanout``: children per fork per level (product = heads).
        rescale: insert the gradient-rescaling op (x 1/fan-out backward) at every fork.
        branch_init: ``"independent"`` (every cloned copy gets timm's own initialisation, drawn
            independently; the default for a randomly initialised model) or ``"copy"`` (exact
            copies). With pretrained weights (``pretrained=True``, ``weights=``, or a module) the
            default copies what was pretrained and draws the rest (e.g. a new classifier) per branch.
        weights: a local safetensors / timm checkpoint to load before splitting.
        seed: seed of the independent draws (default: drawn from torch's global RNG).
        input_size: (C, H, W) of the probe batch used to verify the cut; default the model's own.
        **create_kwargs: passed to ``timm.create_model`` (``num_classes``, ``pretrained``, ...).
    """
    at = [p for p in at.split(",") if p] if isinstance(at, str) else list(at)
    if not isinstance(heads, int) or heads < 1:
        raise HeadsurgeonError(f"heads must be a positive integer, got {heads!r}")
    if heads > 1 and not at:
        raise HeadsurgeonError(f"{heads} heads need at least one split point; pass at=['input'] for independent instances")
    fanout = default_fanout(heads, len(at)) if fanout is None else [int(f) for f in fanout]
    if len(fanout) != len(at) or math.prod(fanout) != heads or any(f < 1 for f in fanout):
        raise HeadsurgeonError(f"fan-out {fanout} does not match {len(at)} split point(s) and {heads} heads: "
                               f"give one positive factor per split point whose product is {heads}")
    if branch_init not in (None, *BRANCH_INITS):
        raise HeadsurgeonError(f"branch_init must be one of {', '.join(BRANCH_INITS)}, got {branch_init!r}")

    m, name, trained = _source(model, dict(create_kwargs), weights)
    label = name or type(m).__name__
    arch, args = _architecture(m), _model_args(m)
    if branch_init is None:
        branch_init = "independent" if trained is None else "pretrained"
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())

    traced: Traced = trace(m, label, leaf_modules)
    size = tuple(input_size) if input_size else default_input_size(m)
    example = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    valid = None
    cuts = {}
    for mode, g, names in (("train", traced.train_graph, traced.train_names), ("eval", traced.eval_graph, traced.eval_names)):
        valid = valid or _valid_points(m, names)
        cuts[mode] = resolve_all(g, names, at, label, valid)
    tgs, egs = cut_graph(traced.train_graph, cuts["train"]), cut_graph(traced.eval_graph, cuts["eval"])
    for s, (tg, eg) in enumerate(zip(tgs, egs)):
        nt = sum(n.op == "placeholder" for n in tg.nodes)
        ne = sum(n.op == "placeholder" for n in eg.nodes)
        if nt != ne:
            raise HeadsurgeonError(f"{label} passes different values across '{at[s - 1]}' in train and eval mode; "
                                   f"choose another split point or create the model with drop rates of 0")
    protos = [_segment(m, tg, eg) for tg, eg in zip(tgs, egs)]
    unused = _fix_keys(protos, m)

    # Verify the cut chain against eager in both modes, and find segments that mutate inputs.
    mutated = [False] * len(protos)
    if verify:
        whole = _segment(m, traced.train_graph, traced.eval_graph)
        check_against_eager(m, {"the traced graph": (whole, [whole]),
                                "the cut model": (lambda x: _probe_chain(protos, x, mutated), protos)}, example, label)
    else:
        run_both_modes(lambda x: _probe_chain(protos, x, mutated), example, m, *protos)

    # Tensors read by more than one segment stay one tensor shared by every branch (CoaT).
    owners = [_tensor_owner(p) for p in protos]
    counts: dict[int, int] = {}
    for o in owners:
        for k in o:
            counts[k] = counts.get(k, 0) + 1
    shared = {k for k, c in counts.items() if c > 1}
    memo_base = {k: owners[i][k] for i in range(len(owners)) for k in owners[i] if k in shared}
    for p in protos:  # modules whose every tensor is shared are shared too
        for mod in p.modules():
            ts = [*mod.parameters(), *mod.buffers()]
            if ts and all(id(t) in shared for t in ts):
                memo_base[id(mod)] = mod

    levels: list[list[nn.Module]] = [[protos[0]]]
    for level in range(1, len(protos)):
        n = math.prod(fanout[:level])
        levels.append([protos[level]] + [copy.deepcopy(protos[level], dict(memo_base)) for _ in range(n - 1)])

    fresh_keys = _independent_keys(m, trained, branch_init)
    if fresh_keys and heads > 1:
        _draw_independent(levels, arch, args, fresh_keys, seed, shared_ids=shared)
    elif heads > 1 and branch_init == "pretrained" and not _quiet and not _has_stochastic(protos[1:]):
        warnings.warn(
            f"all {heads} heads start as exact copies and {label} has no dropout/drop-path in its branches, so they will "
            f"stay identical and collaborative learning will do nothing; use branch_init='independent' "
            f"(--branch-init independent) or create the model with drop_path_rate/drop_rate > 0",
            stacklevel=2,
        )

    spec = {
        "format": FORMAT,
        "source": name,
        "architecture": arch,
        "model_args": args,
        "pretrained_cfg": _json_safe(dict(getattr(m, "pretrained_cfg", {}) or {})),
        "no_weight_decay": sorted(_no_weight_decay(m)),
        "unused": unused,  # weights no node reads: kept in the trunk for the strict reload
        "at": at,
        "heads": heads,
        "fanout": fanout,
        "rescale": bool(rescale),
        "branch_init": branch_init,
        "seed": seed,
        "input_size": list(size),
        "leaf_modules": [f"{c.__module__}:{c.__qualname__}" for c in leaf_modules],
        "versions": {"headsurgeon": __version__, "timm": timm.__version__, "torch": torch.__version__},
    }
    tree = HeadTree(levels, fanout, rescale, mutated, spec)
    tree.train(m.training)
    return tree


def _valid_points(m: nn.Module, names: dict[fx.Node, str]) -> list[str]:
    """Split points to suggest: timm ``feature_info`` modules that resolve, then every other path."""
    feats = feature_points(m, names)
    return feats + [p for p in point_names(names) if p not in feats]


def _no_weight_decay(m: nn.Module) -> set[str]:
    fn = getattr(m, "no_weight_decay", None)
    if not callable(fn):
        return set()
    names = set(fn())
    params = dict(m.named_parameters())
    return {n for n in params if n in names or any(n.startswith(p + ".") for p in names)}


def _independent_keys(m: nn.Module, trained: set[str] | None, branch_init: str) -> set[str]:
    """Keys each cloned copy draws afresh: all, the ones that were not pretrained, or none."""
    keys = set(m.state_dict())
    if branch_init == "independent":
        return keys
    if branch_init == "pretrained":
        return keys - (trained or set())
    return set()


def _has_stochastic(segs: Sequence[nn.Module]) -> bool:
    from timm.layers import DropBlock2d, DropPath

    for seg in segs:
        for mod in seg.modules():
            p = getattr(mod, "drop_prob", None) if isinstance(mod, (DropPath, DropBlock2d)) else (
                mod.p if isinstance(mod, nn.Dropout) else None)
            if p:
                return True
    return False


def _draw_independent(levels: list[list[nn.Module]], arch: str, args: dict[str, Any],
                      keys: set[str], seed: int, shared_ids: set[int]) -> None:
    """Give copy ``j`` of every cloned segment the weights of a fresh instance seeded ``seed + j``.

    Copy 0 keeps the source's weights; each head is therefore made of timm's own
    initialisation of its architecture, drawn independently per copy.
    """
    width = max(len(segs) for segs in levels)
    for j in range(1, width):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + j)
            fresh = _create(arch, args).state_dict()
        for segs in levels[1:]:
            if j < len(segs):
                seg = segs[j]
                with torch.no_grad():
                    for k, t in seg.state_dict(keep_vars=True).items():
                        if k in keys and id(t) not in shared_ids:
                            t.copy_(fresh[k])
        del fresh

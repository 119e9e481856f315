"""The head tree: the fork op, :class:`SplitSpec`, :class:`HeadTree` and :func:`split`.

Level 0 is the trunk; level ``l`` holds ``prod(fanout[:l])`` copies of segment ``l``, and
copy ``j`` feeds on the output of copy ``j // fanout[l-1]`` of the level above. Every
segment is an ``fx.GraphModule`` whose submodules sit at their original dotted paths, so
parameter names end with the timm name (``levels.1.0.layer3.0.conv1.weight``) and the
weights of one root-to-leaf path load into the original timm class unchanged.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import safetensors.torch
import timm
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, model_validator
from torch import fx, nn
from torch.utils._pytree import tree_leaves, tree_map_only
from torchvision.models.feature_extraction import DualGraphModule

from . import models, verify
from .cut import INPUT, cut_graph, feature_points, point_names, resolve_all
from .errors import HeadsurgeonError, first_line
from .storage import atomic_dir, sha256_file
from .trace import class_path, import_classes, spec_classes, trace
from .version import __version__

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "tree.safetensors"
CHECKSUM_FILE = "tree.safetensors.sha256"
FORMAT = 1  # what a tree of one architecture writes (headsurgeon before peers reads it)
PEERS_FORMAT = 2  # what a tree of heterogeneous peers writes: older versions say "upgrade", not a key error
BranchInit = Literal["independent", "copy", "pretrained"]
# independent: every cloned copy draws timm's own init; copy: exact copies; pretrained (the default
# when split() starts from pretrained weights): copy what was pretrained, draw the rest per copy.
BRANCH_INITS: tuple[str, ...] = BranchInit.__args__


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
    """Apply the fork op to every tensor in ``values`` (a tensor, or the tuple of values crossing a cut)."""

    def one(t: torch.Tensor) -> torch.Tensor:
        if t.requires_grad and (scale != 1.0 or own):
            return _Fork.apply(t, scale, own)
        return t.clone() if own else t

    return tree_map_only(torch.Tensor, one, values)


# ------------------------------------------------------------------------------- the spec

class Peer(BaseModel):
    """One head's model: what timm creates to rebuild or collapse that head.

    A tree of one architecture has one (the spec's own fields, :meth:`SplitSpec.peer`); a tree of
    heterogeneous peers (split at ``input``) records one per head in ``SplitSpec.peers``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    architecture: str = Field(min_length=1)  # registered timm name, what collapse creates
    model_args: dict[str, Any] = {}  # kwargs for timm.create_model(architecture, ...)
    source: Optional[str] = None  # the name split() was given (None: a module)
    pretrained_cfg: dict[str, Any] = {}
    no_weight_decay: tuple[str, ...] = ()  # parameter names timm's optimizer does not decay
    unused: tuple[str, ...] = ()  # weights no node reads, kept for the strict reload


PEER_FIELDS: tuple[str, ...] = tuple(Peer.model_fields)


class SplitSpec(BaseModel):
    """Everything needed to rebuild a tree from timm: what ``spec.json`` holds.

    Immutable and validated; ``to_json``/``from_json`` round-trip it. ``HeadTree.load`` rebuilds
    the model with ``models.model_from_spec`` and cuts it again at ``at``. The top-level model
    fields (``architecture`` ... ``unused``) describe head 0's model; a tree of heterogeneous peers
    also lists every head's in ``peers`` (the first equal to the top level, which also decides the
    tree's data config: its ``pretrained_cfg``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    architecture: str = Field(min_length=1)  # registered timm name, what collapse creates
    model_args: dict[str, Any] = {}  # kwargs for timm.create_model(architecture, ...)
    at: tuple[str, ...] = ()  # split points in forward order
    heads: StrictInt = Field(1, ge=1)
    fanout: tuple[StrictInt, ...] = ()  # children per fork at each split point; product = heads
    rescale: StrictBool = True  # gradient x 1/fan-out at every fork
    branch_init: BranchInit = "independent"
    seed: Optional[StrictInt] = None  # of the independent draws (copy j: seed + j)
    input_size: Optional[tuple[StrictInt, ...]] = None  # (C, H, W) the cut was verified at
    source: Optional[str] = None  # the name split() was given (None: a module)
    pretrained_cfg: dict[str, Any] = {}
    no_weight_decay: tuple[str, ...] = ()  # source parameter names timm's optimizer does not decay
    unused: tuple[str, ...] = ()  # weights no node reads: kept in the trunk for the strict reload
    leaf_modules: tuple[str, ...] = ()  # extra leaf classes as module:QualName
    owns_input: Optional[tuple[StrictBool, ...]] = None  # per level: mutates its input (None: probe at load)
    versions: dict[str, str] = {}
    peers: tuple[Peer, ...] = ()  # one per head when the heads are different models (empty: all are the above)
    format: StrictInt = FORMAT

    @model_validator(mode="after")
    def _consistent(self) -> "SplitSpec":
        if len(self.fanout) != len(self.at) or math.prod(self.fanout) != self.heads or any(f < 1 for f in self.fanout):
            raise ValueError(f"fanout {list(self.fanout)} does not match {len(self.at)} split point(s) and {self.heads} heads")
        if self.owns_input is not None and len(self.owns_input) != len(self.at) + 1:
            raise ValueError(f"owns_input needs one flag per level ({len(self.at) + 1})")
        if self.peers:
            if self.at != ("input",) or len(self.peers) != self.heads:
                raise ValueError(f"peers need at ['input'] and one peer per head; got at {list(self.at)}, "
                                 f"{len(self.peers)} peers, {self.heads} heads")
            if self.peers[0] != self._own():
                raise ValueError("peers[0] must repeat the top-level model fields (architecture ... unused)")
            if self.format < PEERS_FORMAT:
                raise ValueError(f"a spec with peers has format {PEERS_FORMAT}")
        return self

    def _own(self) -> Peer:
        return Peer(**{k: getattr(self, k) for k in PEER_FIELDS})

    @property
    def hetero(self) -> bool:
        """Whether the heads are models of their own (heterogeneous peers), not copies of one model's branches."""
        return bool(self.peers)

    def peer(self, head: int) -> Peer:
        """The model head ``head`` collapses into (every head's is the same unless the tree has peers)."""
        return self.peers[head] if self.peers else self._own()

    @property
    def label(self) -> str:
        """The model, or the peers' models, by name: ``resnet18`` or ``resnet18 + mobilenetv3_small_100``."""
        return " + ".join(p.architecture for p in self.peers) if self.peers else self.architecture

    def to_json(self) -> str:
        # one model's spec leaves ``peers`` out: it reads as format 1, as headsurgeon before peers wrote it
        return json.dumps(self.model_dump(mode="json", exclude={"peers"} if not self.peers else None),
                          indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "spec") -> "SplitSpec":
        """Parse and validate; every problem is reported in one line."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise HeadsurgeonError(f"'{where}' is unreadable (JSONDecodeError: {e}); re-create the tree") from None
        if not isinstance(raw, dict):
            raise HeadsurgeonError(f"'{where}' is unreadable (not a JSON object); re-create the tree")
        if isinstance(raw.get("format"), int) and raw["format"] > PEERS_FORMAT:
            raise HeadsurgeonError(f"'{where}' was written by a newer headsurgeon (format {raw['format']}); upgrade")
        try:
            spec = cls.model_validate(raw)
        except ValidationError as e:
            bad = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'spec'}: {err['msg']}" for err in e.errors())
            raise HeadsurgeonError(f"'{where}' is unreadable ({bad}); re-create the tree") from None
        bad = _loaded_sizes_problem(spec)
        if bad:
            raise HeadsurgeonError(f"'{where}' is invalid ({bad}); was it edited? restore it or re-create the tree")
        return spec


# A loaded spec's input size is what the tree is traced and verified at (a probe batch of that size): one
# claiming 3x100000x100000 would allocate terabytes. 2**26 values (256 MB in fp32) is 3x4700x4700, four
# times the area of the largest timm pretrained input.
INPUT_VALUES_MAX = 2**26


def _loaded_sizes_problem(spec: "SplitSpec") -> str | None:
    """What is absurd in the sizes of a spec read from disk (hand-edited or corrupt), before anything is built."""
    sizes = [("input_size", spec.input_size)]
    for i, peer in enumerate(spec.peers or [spec._own()]):
        where = f"peers.{i}.pretrained_cfg" if spec.peers else "pretrained_cfg"
        sizes += [(f"{where}.{k}", peer.pretrained_cfg.get(k)) for k in ("input_size", "test_input_size")]
    for key, size in sizes:
        if size is None:
            continue
        if not isinstance(size, (list, tuple)) or len(size) != 3 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
            return f"{key} {list(size) if isinstance(size, (list, tuple)) else size!r:.60} is not three positive integers C, H, W"
        if math.prod(size) > INPUT_VALUES_MAX:
            return f"{key} {'x'.join(map(str, size))} is {math.prod(size):,} values per image, more than {INPUT_VALUES_MAX:,}"
    return None


def _check_copies(spec: "SplitSpec", weights: Path) -> None:
    """The head count and fan-out of a loaded spec must match the branch copies its weights hold (names
    ``levels.L.J.*``), checked from the safetensors header before the tree is built: a spec claiming a
    million heads would otherwise deep-copy a million branches before the weights are found not to fit."""
    try:
        with safetensors.safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # unreadable: _load_weights says so
        return
    copies: dict[int, set[int]] = {}
    for k in keys:
        parts = k.split(".", 3)
        if len(parts) == 4 and parts[0] == "levels" and parts[1].isdigit() and parts[2].isdigit():
            copies.setdefault(int(parts[1]), set()).add(int(parts[2]))
    want = [1]
    for f in spec.fanout:
        want.append(want[-1] * f)
    for level, js in sorted(copies.items()):
        n = want[level] if level < len(want) else 0
        if n > len(js):  # fewer copies than the spec claims (more is cheap to build: _load_weights names the keys)
            raise HeadsurgeonError(f"'{weights}' does not fit the tree its {SPEC_FILE} describes (the spec says "
                                   f"{spec.heads} heads, fan-out {list(spec.fanout)}: {n} copies at level {level}, but "
                                   f"the weights hold {len(js)}): the two files come from different trees, or "
                                   f"{SPEC_FILE} was edited; re-create the tree with `headsurgeon split`")


# ------------------------------------------------------------------------------- the module

class HeadTree(nn.Module):
    """A timm model split into a tree of heads; ``forward`` returns one logits tensor per head."""

    def __init__(self, levels: Sequence[Sequence[nn.Module]], spec: SplitSpec):
        super().__init__()
        self.levels = nn.ModuleList(nn.ModuleList(segs) for segs in levels)
        self.spec = spec
        # plain attributes, read in forward (torch.compile guards on them)
        self.fanout = list(spec.fanout)
        self.rescale = spec.rescale
        self.owns_input = list(spec.owns_input or [False] * len(self.levels))
        self.grad_checkpointing = False
        self._pieces: list[tuple[nn.Module, list[nn.Module]]] = []  # set_grad_checkpointing's

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every segment (trunk and branches) in the backward pass, one block at a time,
        instead of keeping its activations: the forward pass keeps only the values that cross block
        boundaries, and the backward pass holds one block's insides at a time (as timm's own
        ``checkpoint_seq`` does). A segment without blocks, one with hooks, or one whose blocks write
        into their inputs is recomputed whole (:mod:`headsurgeon.recompute`).

        Call it after replacing submodules (e.g. ``convert_sync_batchnorm``): the per-block pieces
        hold the segments' submodules as they are now. As with timm's own ``set_grad_checkpointing``,
        batch-norm running statistics are updated again by the recomputation (gradients are unchanged)."""
        self.grad_checkpointing = enable
        self._pieces = self._block_pieces() if enable else []

    def _block_pieces(self) -> list[tuple[nn.Module, list[nn.Module]]]:
        """(segment, its pieces) for every segment that has blocks and whose blocks leave their inputs alone.
        Probed once with a seeded batch at the spec's input size, in eval mode, without gradients or RNG use."""
        from . import recompute

        split_ = [(seg, recompute.pieces(seg)) for segs in self.levels for seg in segs]
        inputs: dict[int, tuple] = {}

        def keep(m: nn.Module, args: tuple) -> None:
            inputs.setdefault(id(m), tree_map_only(torch.Tensor, torch.clone, args))

        hooks = [seg.register_forward_pre_hook(keep) for seg, parts in split_ if parts]
        p = next(iter(self.parameters()))
        try:
            with verify.eval_mode(self), torch.no_grad(), torch.random.fork_rng(
                    devices=[p.device] if p.device.type == "cuda" else []):
                self(verify.probe(self.spec.input_size or (3, 224, 224), 0, self))
                return [(seg, parts) for seg, parts in split_
                        if parts and not recompute.mutates_input(parts, *inputs[id(seg)])]
        finally:
            for h in hooks:
                h.remove()

    def _run(self, seg: nn.Module, *args: Any) -> Any:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            from . import recompute
            from torch.utils.checkpoint import checkpoint

            parts = next((parts for owner, parts in self._pieces if owner is seg), None)
            if parts is None or seg._forward_hooks or seg._forward_pre_hooks:  # hooks see the segment's call
                return checkpoint(seg, *args, use_reentrant=False)
            return recompute.run(parts, *args)
        return seg(*args)

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
        outs = [self._run(self.levels[0][0], x)]
        for level in range(1, len(self.levels)):
            f = self.fanout[level - 1]
            scale = 1.0 / f if self.rescale else 1.0
            own = self.owns_input[level] and f > 1
            outs = [self._run(seg, *fork(outs[j // f], scale, own)) for j, seg in enumerate(self.levels[level])]
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
        return any(p.unused for p in (self.spec.peers or [self.spec]))

    def _peer_of(self, name: str) -> tuple[int, str]:
        """The peer a tree parameter name (``levels.L.J.<timm name>``) belongs to, and its timm name."""
        _, level, copy_, timm_name = name.split(".", 3)
        return (int(copy_) if self.spec.peers and level != "0" else 0), timm_name

    def no_weight_decay(self) -> set[str]:
        """Tree names of the source model's no-weight-decay parameters (read by timm's optimizer)."""
        base = [set(self.spec.peer(h).no_weight_decay) for h in range(len(self.spec.peers) or 1)]
        out = set()
        for name, _ in self.named_parameters():
            i, timm_name = self._peer_of(name)
            if timm_name in base[i]:
                out.add(name)
        return out

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """The source model's layer groups for tree parameter names (timm's layer-wise lr decay).

        Every copy of a branch parameter gets the layer id of its timm name in the original model,
        so ``create_optimizer_v2(tree, layer_decay=...)`` scales the tree like the model it came from.
        The source is built on the meta device: only its names and its own ``group_matcher`` are read.
        Heterogeneous peers have different depths: each peer's layer ids are shifted so that its last
        group (the classifier) is the tree's last, i.e. every peer decays from its own head down.
        """
        from timm.models import group_parameters

        layer_of = []
        for h in range(len(self.spec.peers) or 1):
            with torch.device("meta"):
                source = models.model_from_spec(self.spec, h)
            if not hasattr(source, "group_matcher"):
                raise HeadsurgeonError(f"optim.layer_decay needs layer groups; timm's {self.spec.peer(h).architecture} "
                                       f"defines no group_matcher (drop optim.layer_decay)")
            layer_of.append(group_parameters(source, source.group_matcher(coarse=coarse), reverse=True))
        lasts = [max(m.values(), default=0) for m in layer_of]
        shift = [max(lasts) - last for last in lasts]

        def layer(name: str) -> int:
            i, timm_name = self._peer_of(name)
            return layer_of[i].get(timm_name, lasts[i]) + shift[i]

        return layer

    def classifier(self, head: int) -> nn.Module:
        """Head ``head``'s classifier (the module timm's ``pretrained_cfg['classifier']`` names) in its last
        segment: its input is the head's pre-logits features, which training reads with a forward pre-hook."""
        self.path(head)  # validates the index
        peer = self.spec.peer(head)  # heterogeneous peers name their own classifiers
        names = peer.pretrained_cfg.get("classifier") or ()
        leaf = self.levels[-1][head]
        found = []
        for name in [names] if isinstance(names, str) else names:
            try:
                found.append(leaf.get_submodule(name))
            except AttributeError:
                pass
        if len(found) != 1:
            raise HeadsurgeonError(f"{peer.architecture} has {len(found)} classifiers named by its pretrained_cfg "
                                   f"({names or 'none'}) in head {head}'s last segment; per-head features need exactly one")
        return found[0]

    def run_head(self, head: int, x: torch.Tensor) -> Any:
        """Forward through one root-to-leaf path only (what a collapsed model computes)."""
        segs = self.segments(head)
        vals = segs[0](x)
        for seg in segs[1:]:
            vals = seg(*vals)
        return vals

    def collapse(self, head: int, probe: torch.Tensor | None = None, atol: float = verify.COLLAPSE_ATOL) -> nn.Module:
        """Head ``head`` as a plain timm model of the original class, in eval mode, verified against the tree.

        Its weights load with ``strict=True`` into ``timm.create_model(architecture, **model_args)``;
        raises ``HeadsurgeonError`` if that fails or if its eval logits differ from the tree head's
        by more than ``atol`` (fp32) on ``probe`` (default: a seeded batch at ``spec.input_size``).
        """
        path = self.path(head)  # validates the index
        model = models.model_from_spec(self.spec, head)
        p = next(iter(self.parameters()))
        model.to(device=p.device, dtype=p.dtype)  # before the load: a float64 tree's weights are not rounded to float32
        try:
            model.load_state_dict(self.head_state_dict(head), strict=True)
        except RuntimeError as e:
            lines = str(e).splitlines()
            raise HeadsurgeonError(f"head {head} (path {path}) does not load into {self.spec.peer(head).architecture}: "
                                   f"{lines[1 if len(lines) > 1 else 0][:300]}") from None
        model.eval()
        x = probe if probe is not None else verify.probe(self.spec.input_size or (3, 224, 224), 1234, self)
        verify.check_collapsed(self, head, model, x, atol)
        return model

    def nbytes(self) -> int:
        """Size of ``tree.safetensors`` (less its header): what ``save`` is about to write."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def cost(self, input_size: Sequence[int] | None = None, head: int = 0) -> dict[str, int]:
        """Parameters and FLOPs per image of the tree and of head ``head`` (= its base model)."""
        from .points import count_flops

        p = next(iter(self.parameters()))
        x = torch.zeros(1, *(input_size or self.spec.input_size), device=p.device, dtype=p.dtype)
        with verify.eval_mode(self):
            flops = {"tree_flops": count_flops(self, x), "base_flops": count_flops(lambda t: self.run_head(head, t), x)}
        base = {id(t): t.numel() for seg in self.segments(head) for t in seg.parameters()}
        return {"tree_params": sum(t.numel() for t in self.parameters()), "base_params": sum(base.values()), **flops}

    def extra_repr(self) -> str:
        peers = f", peers={[p.architecture for p in self.spec.peers]}" if self.spec.peers else ""
        return f"heads={self.num_heads}, at={list(self.spec.at)}, fanout={self.fanout}, rescale={self.rescale}{peers}"

    def describe(self) -> str:
        """Which segments each head owns, one line per level."""
        bounds = ["input", *self.spec.at, "output"]
        lines = []
        for level, segs in enumerate(self.levels):
            span = f"{bounds[level]} -> {bounds[level + 1]}" if level else f"input -> {bounds[1]}"
            per = f"shared by {self.num_heads // len(segs)} heads" if len(segs) < self.num_heads else "one per head"
            if level and self.spec.peers:
                per += ": " + ", ".join(f"{h} {p.architecture}" for h, p in enumerate(self.spec.peers))
            lines.append(f"level {level}: {len(segs)} x [{span}] ({per})")
        return "\n".join(lines)

    # ---------------------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike, overwrite: bool = False,
             extra: Callable[[Path], None] | None = None) -> Path:
        """Write ``spec.json`` and ``tree.safetensors`` (no pickle) atomically.

        Args:
            directory: created, or replaced when ``overwrite``; must otherwise be new or empty.
            overwrite: replace a non-empty directory.
            extra: writes more files into the directory before it appears (a training checkpoint's state).
        """
        directory = Path(directory)
        with atomic_dir(directory, overwrite) as tmp:
            safetensors.torch.save_model(self, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            (tmp / CHECKSUM_FILE).write_text(f"{sha256_file(tmp / WEIGHTS_FILE)}  {WEIGHTS_FILE}\n")  # sha256sum -c
            (tmp / SPEC_FILE).write_text(self.spec.to_json())
            if extra is not None:
                extra(tmp)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = False,
             leaf_modules: Sequence[str | type] = (), trust_leaf_modules: bool = False) -> "HeadTree":
        """Rebuild the tree from its spec and load its weights.

        The model is created and traced again (the graph is code, not data), but not compared with
        the eager model: that was done when the tree was split. ``verify=True`` repeats the check.
        The spec's leaf modules are imported only if their modules are imported already, or are named in
        ``leaf_modules`` (or :func:`headsurgeon.trace.allow_leaf_modules`), or ``trust_leaf_modules``:
        a spec from disk must not run code (:func:`headsurgeon.trace.spec_classes`).
        """
        directory = Path(directory)
        spec_path, weights = directory / SPEC_FILE, directory / WEIGHTS_FILE
        if not spec_path.is_file() or not weights.is_file():
            raise HeadsurgeonError(
                f"'{directory}' is not a head tree directory (needs {SPEC_FILE} and {WEIGHTS_FILE}); "
                f"create one with `headsurgeon split`"
            )
        _check_sum(directory)
        spec = SplitSpec.from_json(spec_path.read_text(), where=str(spec_path))
        _check_copies(spec, weights)
        leaf = spec_classes(spec.leaf_modules, str(spec_path), leaf_modules, trust_leaf_modules)
        if spec.peers:
            ms = [models.model_from_spec(spec, h) for h in range(spec.heads)]
            levels, owns, _ = _cut_peers(ms, [p.architecture for p in spec.peers],
                                         spec.input_size or models.default_input_size(ms[0]), leaf, check=verify,
                                         owns_input=spec.owns_input)
        else:
            m = models.model_from_spec(spec)
            protos, _, owns = _cut(m, spec.at, spec.input_size or models.default_input_size(m), leaf,
                                   spec.architecture, check=verify, owns_input=spec.owns_input)
            levels = _grow(protos, spec.fanout)[0]
        if spec.owns_input is not None and tuple(owns) != spec.owns_input:
            raise HeadsurgeonError(f"'{directory}': segments that mutate their input changed since the split "
                                   f"({list(spec.owns_input)} -> {owns}); re-create the tree")
        tree = cls(levels, spec.model_copy(update={"owns_input": tuple(owns)}))
        _load_weights(tree, weights, device)
        return tree.to(device)


def _load_weights(tree: nn.Module, weights: Path, device: str | torch.device) -> None:
    """Load ``tree.safetensors`` into ``tree``: a truncated or corrupt file, and weights of another tree
    (a spec.json and tree.safetensors from different splits), are told apart, each in one line."""
    try:
        with safetensors.safe_open(str(weights), framework="pt") as f:
            f.keys()
    except Exception as e:
        raise HeadsurgeonError(f"'{weights}' is unreadable ({first_line(e)}): a truncated or corrupt file; restore it "
                               f"from a copy or re-create the tree") from None
    try:
        missing, unexpected = safetensors.torch.load_model(tree, str(weights), strict=False, device=str(device))
        wrong = []
    except RuntimeError as e:  # mis-shaped tensors; torch names each on a line "size mismatch for KEY: ..."
        missing, unexpected = [], []
        wrong = [ln.strip().split(":")[0].removeprefix("size mismatch for ") for ln in str(e).splitlines()
                 if "size mismatch for" in ln] or [first_line(e)]
    if missing or unexpected or wrong:
        found = [f"{len(keys)} {what}, e.g. {sorted(keys)[0]}" for what, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped tensors", wrong)) if keys]
        raise HeadsurgeonError(f"'{weights}' does not fit the tree its {SPEC_FILE} describes ({'; '.join(found)}): the "
                               f"two files come from different trees; re-create the tree with `headsurgeon split`")


def _check_sum(directory: Path) -> None:
    """``tree.safetensors`` must match the sha256 written with it: a flipped block would otherwise load
    as slightly wrong weights and collapse silently. Trees written before checksums have none."""
    path = directory / CHECKSUM_FILE
    if not path.is_file():
        return
    want = path.read_text(errors="replace").split()[:1]
    got = sha256_file(directory / WEIGHTS_FILE)
    if want != [got]:
        raise HeadsurgeonError(f"'{directory / WEIGHTS_FILE}' does not match its checksum in {CHECKSUM_FILE} "
                               f"(a corrupt file or disk); restore it from a copy or re-create the tree")


# ------------------------------------------------------------------------------- split

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
    if heads is not None and (not isinstance(heads, int) or isinstance(heads, bool) or heads < 1):
        raise HeadsurgeonError(f"heads must be a positive integer, got {heads!r}")
    nc = create_kwargs.get("num_classes")
    if nc is not None and (not isinstance(nc, int) or nc < 1):
        raise HeadsurgeonError(f"num_classes must be a positive integer, got {nc!r} (0 would leave the model "
                               f"without a classifier: nothing to collapse into a classifier head)")
    if input_size is not None and (len(input_size) != 3 or any(not isinstance(v, int) or v < 1 for v in input_size)):
        raise HeadsurgeonError(f"input_size must be three positive integers (C, H, W), e.g. (3, 224, 224); "
                               f"got {tuple(input_size)}")
    leaf_modules = import_classes(leaf_modules)
    if isinstance(model, (list, tuple)):
        return _split_peers(list(model), at, heads, fanout, rescale, branch_init, weights, seed, input_size, verify,
                            leaf_modules, peer_kwargs, create_kwargs)
    if peer_kwargs is not None:
        raise HeadsurgeonError("peer_kwargs are per peer: give a list of models (one per head), or put the kwargs "
                               "in create_kwargs")
    heads = 1 if heads is None else heads
    if heads > 1 and not at:
        raise HeadsurgeonError(f"{heads} heads need at least one split point; split at 'input' (--at input, at=['input']) "
                               f"for independent instances")
    fanout = default_fanout(heads, len(at)) if fanout is None else [int(f) for f in fanout]
    if len(fanout) != len(at) or math.prod(fanout) != heads or any(f < 1 for f in fanout):
        raise HeadsurgeonError(f"fan-out {fanout} does not match {len(at)} split point(s) and {heads} heads: "
                               f"give one positive factor per split point whose product is {heads}")
    if branch_init not in (None, *BRANCH_INITS):
        raise HeadsurgeonError(f"branch_init must be one of {', '.join(BRANCH_INITS)}, got {branch_init!r}")

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
    protos, unused, owns = _cut(m, at, size, leaf_modules, label, check=verify)
    spec = SplitSpec(
        source=src.name, architecture=arch, model_args=args, pretrained_cfg=models.pretrained_cfg(m),
        no_weight_decay=sorted(models.no_weight_decay(m)), unused=unused, at=at, heads=heads, fanout=fanout,
        rescale=bool(rescale), branch_init=branch_init or ("independent" if src.trained is None else "pretrained"),
        seed=int(seed), input_size=size,
        leaf_modules=[class_path(c) for c in leaf_modules], owns_input=owns,
        versions={"headsurgeon": __version__, "timm": timm.__version__, "torch": torch.__version__},
    )
    levels, shared = _grow(protos, fanout)
    fresh = _independent_keys(m, src.trained, spec.branch_init)
    if fresh and heads > 1:
        _draw_independent(levels, spec, fresh, shared)
    elif heads > 1 and spec.branch_init == "pretrained" and not _has_stochastic(protos[1:]):
        warnings.warn(
            f"all {heads} heads start as exact copies and {label} has no dropout/drop-path in its branches, so they will "
            f"stay identical and collaborative learning will do nothing; use branch_init='independent' "
            f"(--branch-init independent) or create the model with drop_path_rate/drop_rate > 0",
            stacklevel=2,
        )
    tree = HeadTree(levels, spec)
    tree.train(m.training)
    return tree


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
    levels, owns, unused = _cut_peers(ms, labels, size, leaf_modules, check=verify)
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


def _cut_peers(ms: Sequence[nn.Module], labels: Sequence[str], size: Sequence[int], leaf_modules: tuple[type, ...],
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
            protos, keys, _ = _cut(m, [], size, leaf_modules, label, check, owns_input=[False])
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


def _cut(m: nn.Module, at: Sequence[str], size: Sequence[int], leaf_modules: tuple[type, ...], label: str,
         check: bool, owns_input: Sequence[bool] | None = None) -> tuple[list[nn.Module], list[str], list[bool]]:
    """Trace ``m`` in both modes and cut it at ``at``: the segments, the keys no node reads, and
    per segment whether it mutates a value it is given (probed unless ``owns_input`` is known).

    ``check`` compares the traced graph and the chain of segments with the eager model in both modes.
    """
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
    return protos, unused, mutated


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


def _grow(protos: list[nn.Module], fanout: Sequence[int]) -> tuple[list[list[nn.Module]], set[int]]:
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


def _draw_independent(levels: list[list[nn.Module]], spec: SplitSpec, keys: set[str], shared_ids: set[int]) -> None:
    """Give copy ``j`` of every cloned segment the weights of a fresh instance seeded ``spec.seed + j``.

    Copy 0 keeps the source's weights; each head is therefore made of timm's own
    initialisation of its architecture, drawn independently per copy.
    """
    width = max(len(segs) for segs in levels)
    for j in range(1, width):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed + j)
            fresh = models.model_from_spec(spec).state_dict()
        for segs in levels[1:]:
            if j < len(segs):
                with torch.no_grad():
                    for k, t in segs[j].state_dict(keep_vars=True).items():
                        if k in keys and id(t) not in shared_ids:
                            t.copy_(fresh[k])
        del fresh

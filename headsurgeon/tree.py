"""The head tree: the fork op, :class:`HeadTree` (forward, collapse) and its files (save, load).

Level 0 is the trunk; level ``l`` holds ``prod(fanout[:l])`` copies of segment ``l``, and
copy ``j`` feeds on the output of copy ``j // fanout[l-1]`` of the level above. Every
segment is an ``fx.GraphModule`` whose submodules sit at their original dotted paths, so
parameter names end with the timm name (``levels.1.0.layer3.0.conv1.weight``) and the
weights of one root-to-leaf path load into the original timm class unchanged.
:func:`headsurgeon.surgery.split` makes a tree; :mod:`headsurgeon.spec` is what it records.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import safetensors.torch
import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from . import models, modes, segments, verify
from .errors import HeadsurgeonError, first_line
from .spec import SPEC_FILE, SplitSpec
from .storage import atomic_dir, sha256_file
from .trace import spec_classes

WEIGHTS_FILE = "tree.safetensors"
CHECKSUM_FILE = "tree.safetensors.sha256"


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


# ------------------------------------------------------------------------------- the module

def _check_copies(spec: SplitSpec, weights: Path) -> None:
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
            with modes.eval_mode(self), torch.no_grad(), torch.random.fork_rng(
                    devices=[p.device] if p.device.type == "cuda" else []):
                self(modes.probe(self.spec.input_size or (3, 224, 224), 0, self))
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

    def forward(self, x: torch.Tensor, heads: Sequence[int] | None = None) -> list[Any]:
        """One output per head; with ``heads``, only the segments on those heads' paths run and the
        other heads' entries are None (an ``instances`` layout runs one instance per rank)."""
        want = None if heads is None else [set(self.path(h)[level] for h in heads) for level in range(len(self.levels))]
        outs = [self._run(self.levels[0][0], x)]
        for level in range(1, len(self.levels)):
            f = self.fanout[level - 1]
            scale = 1.0 / f if self.rescale else 1.0
            own = self.owns_input[level] and f > 1
            outs = [self._run(seg, *fork(outs[j // f], scale, own)) if want is None or j in want[level] else None
                    for j, seg in enumerate(self.levels[level])]
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
                source = models.model_from_peer(self.spec.peer(h))
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
        model = models.model_from_peer(self.spec.peer(head))
        p = next(iter(self.parameters()))
        model.to(device=p.device, dtype=p.dtype)  # before the load: a float64 tree's weights are not rounded to float32
        try:
            model.load_state_dict(self.head_state_dict(head), strict=True)
        except RuntimeError as e:
            lines = str(e).splitlines()
            raise HeadsurgeonError(f"head {head} (path {path}) does not load into {self.spec.peer(head).architecture}: "
                                   f"{lines[1 if len(lines) > 1 else 0][:300]}") from None
        model.eval()
        x = probe if probe is not None else modes.probe(self.spec.input_size or (3, 224, 224), 1234, self)
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
        with modes.eval_mode(self):
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
            ms = [models.model_from_peer(spec.peer(h)) for h in range(spec.heads)]
            levels, owns, _ = segments.cut_peers(ms, [p.architecture for p in spec.peers],
                                                 spec.input_size or models.default_input_size(ms[0]), leaf, check=verify,
                                                 owns_input=spec.owns_input)
        else:
            m = models.model_from_peer(spec.peer(0))
            protos, _, traced = segments.cut_model(m, spec.at, leaf, spec.architecture)
            owns = segments.check_cut(m, traced, protos, spec.input_size or models.default_input_size(m),
                                      spec.architecture, check=verify, owns_input=spec.owns_input)
            levels = segments.grow(protos, spec.fanout)[0]
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



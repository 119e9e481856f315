"""The typed schema of a tree: :class:`Peer` and :class:`SplitSpec`, what ``spec.json`` holds.

Pydantic only, no torch: the timm side (:mod:`headsurgeon.models`) and the model card read a spec
without the tree that made it.
"""
from __future__ import annotations

import json
import math
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, model_validator

from .errors import HeadsurgeonError

SPEC_FILE = "spec.json"
FORMAT = 1  # what a tree of one architecture writes (headsurgeon before peers reads it)
PEERS_FORMAT = 2  # what a tree of heterogeneous peers writes: older versions say "upgrade", not a key error
BranchInit = Literal["independent", "copy", "pretrained"]
# independent: every cloned copy draws timm's own init; copy: exact copies; pretrained (the default
# when split() starts from pretrained weights): copy what was pretrained, draw the rest per copy.
BRANCH_INITS: tuple[str, ...] = BranchInit.__args__


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
    the model with ``models.model_from_peer`` and cuts it again at ``at``. The top-level model
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

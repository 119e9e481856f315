"""Online-distillation objectives for a tree of heads: one small class each, in one registry.

Every objective is called the same way by the training loop::

    objective = get("one", temperature=3.0)              # or OBJECTIVES["one"](temperature=3.0)
    extra = objective.make_modules(channels, heads, num_classes)  # None, or an nn.Module to optimise and checkpoint
    objective.set_epoch(epoch)                           # at the start of every epoch (ramp-ups)
    out = objective(logits, target, features, extra, mean_logits)
    out.loss.backward()                                  # out.hard / out.soft / out.extra: detached, for logging

What ``features`` is, is the class attribute ``feature_source``: None (cl, dml, kdcl: pass nothing),
``"fork"`` (one: the trunk output at the first fork, a tensor) or ``"heads"`` (pcl: a list of every
head's pre-logits features). ``mean_logits`` (``needs_mean_logits``, pcl only) are the heads' logits
under the temporal-mean (EMA) weights of the tree, on the same batch.

``logits`` is the tree's list of per-head ``[B, C]`` tensors. ``target`` is either class indices
``[B]`` or soft targets ``[B, C]`` (probabilities, as timm's ``Mixup`` makes them); with one-hot
soft targets every objective gives the index path's result. Logits in fp16/bf16 (autocast) are
promoted to fp32 before anything is computed. With one head every objective is plain (optionally
label-smoothed) cross-entropy: there is nobody to learn from.

Notation: H heads, z_i head i's logits, T the temperature, p_i = softmax(z_i / T), ``sg`` stop-gradient,
KL(q || p) summed over classes and averaged over the batch ("batchmean"). ``hard[i]`` is CE(y, z_i)
and ``soft[i]`` head i's distillation term, both unweighted; each class says how ``loss`` combines them.

Adding an objective: write a dataclass subclass of :class:`Objective` whose fields are its
parameters, give it a ``name`` and decorate it with ``@register``; nothing else changes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import HeadsurgeonError

__all__ = ["BUILTIN", "OBJECTIVES", "CL", "DML", "KDCL", "LossOut", "ONE", "Objective", "OneGate", "PCL", "PeerEnsemble", "get",
           "register"]

OBJECTIVES: dict[str, type["Objective"]] = {}


def register(cls: type["Objective"]) -> type["Objective"]:
    """Class decorator: make ``cls`` available as ``OBJECTIVES[cls.name]`` and ``get(cls.name)``."""
    if cls.name in OBJECTIVES:
        raise HeadsurgeonError(f"objective {cls.name!r} is registered twice")
    OBJECTIVES[cls.name] = cls
    return cls


def get(name: str, **params) -> "Objective":
    """The objective called ``name`` with ``params`` (its dataclass fields); unknown names or
    parameters raise :class:`HeadsurgeonError` listing the valid ones."""
    if name not in OBJECTIVES:
        raise HeadsurgeonError(f"unknown objective {name!r}; choose one of: {', '.join(sorted(OBJECTIVES))}")
    cls = OBJECTIVES[name]
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise HeadsurgeonError(f"objective {name!r} has no parameter {', '.join(unknown)}; "
                               f"its parameters: {', '.join(known) or '(none)'}")
    return cls(**params)


@dataclass
class LossOut:
    """What an objective returns.

    ``loss``: the scalar to backpropagate. ``hard[i]``: CE(y, z_i); ``soft[i]``: head i's
    distillation term (zero with one head); both unweighted, detached 0-dim tensors (call
    ``.item()`` only when logging, to avoid a device sync per step). ``extra``: other detached
    terms that enter the loss, by name (ONE, PCL: ``teacher_ce``, the CE of their learned teacher).
    ``logits``: the heads' logits, set by :class:`~headsurgeon.task.CollaborativeTask`.

    Also read as a mapping, as ``timm.task.TrainingTask`` results are: ``out["loss"]``, ``out["output"]``
    (the heads' mean logits), ``out["hard"]``, ``out["soft"]`` and the ``extra`` names.
    """
    loss: torch.Tensor
    hard: list[torch.Tensor]
    soft: list[torch.Tensor]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: list[torch.Tensor] | None = None

    def keys(self) -> list[str]:
        return ["loss", *(["output"] if self.logits else []), "hard", "soft", *self.extra]

    def __getitem__(self, key: str):
        if key == "output" and self.logits:
            return torch.stack(self.logits).mean(0)
        if key in ("loss", "hard", "soft"):
            return getattr(self, key)
        if key in self.extra:
            return self.extra[key]
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def get(self, key: str, default=None):
        return self[key] if key in self else default

    def log(self) -> dict:
        """Plain floats for ``metrics.jsonl``: ``{"hard": [...], "soft": [...], **extra}``."""
        return {"hard": [float(v) for v in self.hard], "soft": [float(v) for v in self.soft],
                **{k: float(v) for k, v in self.extra.items()}}


# ---------------------------------------------------------------------------------------------
# shared pieces


def _promote(z: torch.Tensor) -> torch.Tensor:
    """At least fp32: under fp16/bf16 autocast logits arrive in half precision."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _check(logits: Sequence[torch.Tensor], target: torch.Tensor, who: str) -> list[torch.Tensor]:
    logits = [_promote(z) for z in logits]
    if not logits:
        raise HeadsurgeonError(f"{who} needs at least one head's logits")
    if target.is_floating_point() and target.shape != logits[0].shape:
        raise HeadsurgeonError(f"soft targets must have the logits' shape {tuple(logits[0].shape)}, "
                               f"got {tuple(target.shape)}")
    return logits


def hard_ce(z: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """CE(y, z), batch mean; ``target`` class indices ``[B]`` or probabilities ``[B, C]`` (cast to z's dtype)."""
    if target.is_floating_point():
        target = target.to(z.dtype)
    return F.cross_entropy(z, target, label_smoothing=label_smoothing)


def target_logit(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[B, 1]``: z[y] for class indices, the expected logit sum_c y_c z_c for soft targets
    (the same number for a one-hot target)."""
    if target.is_floating_point():
        return (target.to(z.dtype) * z).sum(1, keepdim=True)
    return z.gather(1, target.view(-1, 1))


def kl_t(student: torch.Tensor, teacher: torch.Tensor, temperature: float, eps: float = 0.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over classes, mean over the batch.

    The teacher is used as given: callers detach it. ``eps`` > 0 reproduces ONE's and OKDDip's
    official code, which adds ``eps`` to the teacher probabilities in both places it appears.
    """
    log_p = F.log_softmax(student / temperature, dim=1)
    if eps:
        q = F.softmax(teacher / temperature, dim=1) + eps
        log_q = q.log()
    else:
        log_q = F.log_softmax(teacher / temperature, dim=1)
        q = log_q.exp()
    return temperature * temperature * (q * (log_q - log_p)).sum(1).mean()


def ramp_weight(epoch: int, ramp: int) -> float:
    """ONE's sigmoid ramp-up (Laine & Aila): exp(-5 (1 - min(e, ramp)/ramp)^2) for the 0-based
    epoch e; 1 when ``ramp`` is 0 (no ramp)."""
    if ramp <= 0:
        return 1.0
    x = 1.0 - min(epoch, ramp) / ramp
    return math.exp(-5.0 * x * x)


def _detached(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach() for t in ts]


class Objective:
    """Base class. Subclasses are dataclasses whose fields are their parameters."""

    name: ClassVar[str] = ""
    #: what ``features`` must be: None (nothing), "fork" (the trunk output at the first fork) or
    #: "heads" (the list of every head's pre-logits features)
    feature_source: ClassVar[str | None] = None
    #: whether ``mean_logits`` (the EMA tree's per-head logits on the batch) must be passed
    needs_mean_logits: ClassVar[bool] = False

    def __post_init__(self):
        self.epoch = 0
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "temperature" and not v > 0:
                raise HeadsurgeonError(f"temperature must be > 0, got {v}")
            if f.name == "label_smoothing" and not 0.0 <= v < 1.0:
                raise HeadsurgeonError(f"label_smoothing must be in [0, 1), got {v}")
            if f.name == "ramp" and (not isinstance(v, int) or v < 0):
                raise HeadsurgeonError(f"ramp must be an integer >= 0 (epochs), got {v!r}")
            if f.name == "eps" and not v >= 0:
                raise HeadsurgeonError(f"eps must be >= 0, got {v}")

    def describe(self) -> dict:
        """``{"name": ..., **parameters}``, JSON-serialisable, for summary.json and the model card."""
        return {"name": self.name, **asdict(self)}

    def make_modules(self, feature_channels: int, heads: int, num_classes: int | None = None) -> nn.Module | None:
        """Learned parts besides the heads (the trainer optimises and checkpoints them; they are never
        part of a collapsed model), or None."""
        return None

    def set_epoch(self, epoch: int) -> None:
        """Tell the objective the 0-based epoch about to run (for a ramp-up of the distillation weight)."""
        self.epoch = int(epoch)

    @property
    def soft_weight(self) -> float:
        """The distillation weight this epoch: the ramp if the objective has one, else 1."""
        return ramp_weight(self.epoch, getattr(self, "ramp", 0))

    def __call__(self, logits: Sequence[torch.Tensor], target: torch.Tensor,
                 features: torch.Tensor | None = None, modules: nn.Module | None = None,
                 mean_logits: Sequence[torch.Tensor] | None = None) -> LossOut:
        """The loss. ``features``/``modules``: the input of and the module from :meth:`make_modules`
        (ONE, PCL); ``mean_logits``: the temporal-mean (EMA) heads' logits (PCL). Others ignore them."""
        raise NotImplementedError

    def _single(self, logits: list[torch.Tensor], target: torch.Tensor) -> LossOut:
        ce = hard_ce(logits[0], target, getattr(self, "label_smoothing", 0.0))
        return LossOut(ce, [ce.detach()], [ce.new_zeros(()).detach()])


# ---------------------------------------------------------------------------------------------
# the objectives


@register
@dataclass
class CL(Objective):
    """Collaborative learning (Song & Chai, NeurIPS 2018, eq. 2-4): the paper's objective, the default.

    ``loss = sum_i [beta * hard_i + (1 - beta) * soft_i]``, ``hard_i = CE(y, z_i)``,
    ``soft_i = [T^2 if t2] * H(q_i, softmax(z_i / T))`` (soft cross-entropy, not KL: the two differ by
    the constant entropy of q_i), ``q_i = softmax(sg(mean_{j != i} z_j) / T)``. Summed, not averaged,
    over heads; the tree's rescale op keeps the shared layers at single-model gradient scale.

    The paper has no official code. The re-implementations differ (research notes §7): OKDDip's uses
    KL with T=3, T^2, a ramp and does not detach the target; MCL-OKD's uses 0.5/0.5, T=2, T^2 and
    detaches. Ours is the paper's form; ``t2`` is open because the paper does not say.
    This is exactly (bit for bit) :func:`headsurgeon.collaborative_loss`, which calls it.

    ``beta_end`` makes the consensus *late* (NCT, JoCoR and codistillation's burn-in weight it late, where
    memorisation happens; research notes regime.md §2b, §4): beta moves linearly from ``beta`` at epoch 0
    to ``beta_end`` at the 0-based epoch ``beta_epochs - 1`` and stays there, by :meth:`set_epoch`.
    """
    name: ClassVar[str] = "cl"
    beta: float = 0.5
    temperature: float = 2.0
    t2: bool = False
    label_smoothing: float = 0.0
    beta_end: float | None = None
    beta_epochs: int = 0

    def __post_init__(self):
        for k in ("beta", "beta_end"):
            v = getattr(self, k)
            if v is not None and not 0.0 <= v <= 1.0:
                raise HeadsurgeonError(f"{k} must be in [0, 1], got {v}")
        if self.beta_end is not None and (not isinstance(self.beta_epochs, int) or self.beta_epochs < 1):
            raise HeadsurgeonError(f"beta_end needs beta_epochs, the epochs over which beta moves (an integer "
                                   f">= 1, e.g. the run's epochs), got {self.beta_epochs!r}")
        super().__post_init__()

    def describe(self) -> dict:
        d = super().describe()
        if self.beta_end is None:  # a constant beta has no schedule to record
            del d["beta_end"], d["beta_epochs"]
        return d

    @property
    def beta_now(self) -> float:
        """The hard-term weight this epoch: ``beta``, or its linear schedule towards ``beta_end``."""
        if self.beta_end is None:
            return self.beta
        if self.beta_epochs <= 1:
            return self.beta_end
        f = min(self.epoch, self.beta_epochs - 1) / (self.beta_epochs - 1)
        return (1 - f) * self.beta + f * self.beta_end  # exactly beta at f = 0 and beta_end at f = 1

    def __call__(self, logits, target, features=None, modules=None, mean_logits=None) -> LossOut:
        beta, temperature = self.beta_now, self.temperature
        logits = _check(logits, target, "collaborative_loss")
        heads = len(logits)
        hard = [hard_ce(z, target, self.label_smoothing) for z in logits]
        if heads == 1:
            return LossOut(hard[0], _detached(hard), [hard[0].new_zeros(()).detach()])
        scale = temperature * temperature if self.t2 else 1.0
        total = torch.stack(logits).sum(0).detach()
        loss = logits[0].new_zeros(())
        softs = []
        for z, ce in zip(logits, hard):
            q = F.softmax((total - z.detach()) / (heads - 1) / temperature, dim=1)
            soft = -(q * F.log_softmax(z / temperature, dim=1)).sum(1).mean()
            loss = loss + beta * ce + (1.0 - beta) * scale * soft
            softs.append(soft.detach() * scale)
        return LossOut(loss, _detached(hard), softs)


@register
@dataclass
class DML(Objective):
    """Deep Mutual Learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018), the paper's K-network form.

    ``loss = sum_i [hard_i + w * soft_i]``, ``soft_i = 1/(H-1) sum_{j != i} T^2 KL(sg(p_j) || p_i)``,
    w the ramp weight (1 unless ``ramp`` > 0).

    The official code (TF, Market-1501 only) uses T=1 without T^2 and **sums** the peer terms;
    the paper's K-network loss **averages** them (1/(K-1)), which we follow (the two agree for two
    heads). It trains each network with its own optimizer on alternating batches, which makes the
    peer a constant; we train all heads jointly in one step with the peers detached, the same
    stop-gradient in one pass (as MCL-OKD's re-implementation does). The default T=1 is the paper's;
    T^2 is always applied, so T=1 is exactly the paper and T=2 is MCL-OKD's variant.
    """
    name: ClassVar[str] = "dml"
    temperature: float = 1.0
    ramp: int = 0
    label_smoothing: float = 0.0

    def __call__(self, logits, target, features=None, modules=None, mean_logits=None) -> LossOut:
        logits = _check(logits, target, "dml")
        if len(logits) == 1:
            return self._single(logits, target)
        heads, w = len(logits), self.soft_weight
        hard = [hard_ce(z, target, self.label_smoothing) for z in logits]
        peers = [z.detach() for z in logits]
        soft = [sum(kl_t(z, peers[j], self.temperature) for j in range(heads) if j != i) / (heads - 1)
                for i, z in enumerate(logits)]
        loss = sum(h + w * s for h, s in zip(hard, soft))
        return LossOut(loss, _detached(hard), _detached(soft))


def pool_features(x: torch.Tensor, channels: int, who: str = "pool_features") -> torch.Tensor:
    """``[B, channels]`` from ``[B, channels]``, ``[B, L, channels]`` tokens (mean over all tokens),
    ``[B, channels, H, W]`` (NCHW) or ``[B, H, W, channels]`` (NHWC, when dim 1 is not ``channels``)."""
    c = channels
    if x.dim() == 4:
        if x.shape[1] == c:
            x = x.mean((2, 3))
        elif x.shape[-1] == c:
            x = x.mean((1, 2))
    elif x.dim() == 3 and x.shape[-1] == c:
        x = x.mean(1)
    if x.dim() != 2 or x.shape[1] != c:
        raise HeadsurgeonError(f"{who} takes [B, {c}], [B, L, {c}] tokens or [B, {c}, H, W] / [B, H, W, {c}] "
                               f"features, got {tuple(x.shape)}")
    return x


class OneGate(nn.Module):
    """ONE's gate: global-pooled trunk features -> linear -> softmax over the heads, ``[B, heads]``.

    Input: ``[B, C, H, W]`` (NCHW, pooled over H, W), ``[B, H, W, C]`` (NHWC, e.g. Swin stages;
    recognised when dim 1 is not ``in_features`` but the last dim is), ``[B, L, C]`` tokens (mean over
    all L tokens, class/register tokens included: the gate cannot know how many prefix tokens a model
    has, and the mean is what an architecture-agnostic pool can do), or ``[B, C]`` (used as is).

    Deviation from the official code (GAP -> Linear -> BatchNorm1d -> ReLU -> softmax): the issue's
    linear -> softmax. BatchNorm1d ties the weights of a sample to its batch (and breaks at batch
    size 1), and ReLU before softmax zeroes the gradient of every negative gate logit. The linear
    layer starts at zero, so training starts from the plain average of the heads.
    """

    def __init__(self, in_features: int, heads: int):
        super().__init__()
        if in_features < 1 or heads < 1:
            raise HeadsurgeonError(f"OneGate needs in_features >= 1 and heads >= 1, got {in_features}, {heads}")
        self.in_features, self.heads = int(in_features), int(heads)
        self.fc = nn.Linear(self.in_features, self.heads)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_features]`` from a 2-D, 3-D (tokens, NLC) or 4-D (NCHW or NHWC) feature."""
        return pool_features(x, self.in_features, f"OneGate({self.in_features}, {self.heads})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.fc(self.pool(x)), dim=1)


@register
@dataclass
class ONE(Objective):
    """On-the-fly Native Ensemble (Lan, Zhu & Gong, NeurIPS 2018).

    A gate (:class:`OneGate`, from :meth:`make_modules`) weighs the heads from the trunk features at
    the first fork: g = gate(features) ``[B, H]``, teacher z_t = sum_i g_i z_i. ``loss = sum_i hard_i +
    teacher_ce + w * sum_i soft_i``, ``teacher_ce = CE(y, z_t)``, ``soft_i = T^2 KL(softmax(sg(z_t)/T) || p_i)``.
    The teacher is detached inside the KL, so the gate (and, through z_t, the heads) learn from the
    teacher only via CE(y, z_t) -- as the official code does (OKDDip's re-implementation does not
    detach).

    Official code: T=3 hard-coded, a ramp-up of the KL weight over 80 epochs (``ramp=80``
    reproduces it; default 0, the issue's formula, as the paper's text has no ramp), and 1e-7 added to
    the teacher probabilities (``eps=1e-7`` reproduces it; the default 0 keeps the teacher a
    distribution; the loss moves by about 1e-5). The gate deviates, see :class:`OneGate`.
    Call with ``features`` and the gate (``modules``), or use :meth:`from_weights` with the gate's
    output. With one head: plain CE, no gate.
    """
    name: ClassVar[str] = "one"
    feature_source: ClassVar[str | None] = "fork"
    temperature: float = 3.0
    ramp: int = 0
    eps: float = 0.0
    label_smoothing: float = 0.0

    def make_modules(self, feature_channels: int, heads: int, num_classes: int | None = None) -> nn.Module | None:
        return OneGate(feature_channels, heads) if heads > 1 else None

    def __call__(self, logits, target, features=None, modules=None, mean_logits=None) -> LossOut:
        if len(logits) == 1:
            return self._single(_check(logits, target, "one"), target)
        if features is None or modules is None:
            raise HeadsurgeonError("objective 'one' needs the trunk features at the first fork and its gate "
                                   "(objective.make_modules(channels, heads)) in every call")
        return self.from_weights(logits, target, modules(features))

    def from_weights(self, logits: Sequence[torch.Tensor], target: torch.Tensor, weights: torch.Tensor) -> LossOut:
        """The loss for given gate weights ``[B, H]`` (rows on the simplex)."""
        logits = _check(logits, target, "one")
        if len(logits) == 1:
            return self._single(logits, target)
        heads, w = len(logits), self.soft_weight
        weights = _promote(weights)
        if weights.shape != (logits[0].shape[0], heads):
            raise HeadsurgeonError(f"gate weights must be [B, H] = {(logits[0].shape[0], heads)}, "
                                   f"got {tuple(weights.shape)}")
        teacher = sum(weights[:, i:i + 1] * z for i, z in enumerate(logits))
        hard = [hard_ce(z, target, self.label_smoothing) for z in logits]
        teacher_ce = hard_ce(teacher, target, self.label_smoothing)
        t = teacher.detach()
        soft = [kl_t(z, t, self.temperature, self.eps) for z in logits]
        loss = sum(hard) + teacher_ce + w * sum(soft)
        return LossOut(loss, _detached(hard), _detached(soft), {"teacher_ce": teacher_ce.detach()})


@register
@dataclass
class KDCL(Objective):
    """Online Knowledge Distillation via Collaborative Learning, MinLogit variant (Guo et al., CVPR 2020).

    Teacher per sample and class: z_t,c = min_i (z_i,c - z_i,y), every head re-referenced so its
    target logit is 0, then the element-wise minimum: the most confident (lowest) competitor logit
    over the heads. ``loss = sum_i [hard_i + w * soft_i]``, ``soft_i = T^2 KL(softmax(sg(z_t)/T) || p_i)``.

    No official code exists (research notes §4); the MinLogit definition and T are from the paper
    as recalled, not verified; the only public re-implementation uses the mean of the logits instead.
    T=3 by default (as ONE). KDCL also feeds each student its own augmentation of the image; a tree
    gives every head the same batch. With soft targets (mixup) z_i,y is the expected target logit
    sum_c y_c z_i,c, which is z_i,y for a one-hot target.
    """
    name: ClassVar[str] = "kdcl"
    temperature: float = 3.0
    ramp: int = 0
    label_smoothing: float = 0.0

    def teacher(self, logits: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """The MinLogit teacher ``[B, C]`` (not detached)."""
        return torch.stack([z - target_logit(z, target) for z in logits]).min(0).values

    def __call__(self, logits, target, features=None, modules=None, mean_logits=None) -> LossOut:
        logits = _check(logits, target, "kdcl")
        if len(logits) == 1:
            return self._single(logits, target)
        w = self.soft_weight
        hard = [hard_ce(z, target, self.label_smoothing) for z in logits]
        t = self.teacher(logits, target).detach()
        soft = [kl_t(z, t, self.temperature) for z in logits]
        loss = sum(h + w * s for h, s in zip(hard, soft))
        return LossOut(loss, _detached(hard), _detached(soft))


class PeerEnsemble(nn.Module):
    """PCL's peer ensemble teacher: every head's pooled pre-logits features, concatenated, -> linear -> logits.

    ``in_features`` is one width for all heads or one per head (heterogeneous peers). ``forward(features)``
    takes the list of the H heads' features (each as :func:`pool_features` accepts: ``[B, width]``, tokens
    or a feature map) and returns ``[B, num_classes]``.
    """

    def __init__(self, in_features: int | Sequence[int], heads: int, num_classes: int):
        super().__init__()
        widths = [int(in_features)] * int(heads) if isinstance(in_features, int) else [int(w) for w in in_features]
        if len(widths) != heads or min([*widths, heads, num_classes]) < 1:
            raise HeadsurgeonError(f"PeerEnsemble needs positive sizes and one width per head, got {in_features}, "
                                   f"{heads}, {num_classes}")
        self.widths, self.heads, self.num_classes = widths, int(heads), int(num_classes)
        self.in_features = widths[0] if len(set(widths)) == 1 else None  # one width for all, else None
        self.fc = nn.Linear(sum(widths), self.num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != self.heads:
            raise HeadsurgeonError(f"PeerEnsemble takes {self.heads} heads' features, got {len(features)}")
        return self.fc(torch.cat([pool_features(f, w, "PeerEnsemble") for f, w in zip(features, self.widths)], 1))


@register
@dataclass
class PCL(Objective):
    """Peer Collaborative Learning (Wu & Gong, AAAI 2021), as its public re-implementation computes it.

    ``loss = teacher_ce + sum_i [hard_i + w * soft_i]``, ``teacher_ce = CE(y, z_pe)``,
    ``soft_i = T^2 KL(softmax(sg(z_pe)/T) || p_i) + 1/(H-1) sum_{l != i} T^2 KL(softmax(sg(z'_l)/T) || p_i)``:
    a peer ensemble teacher z_pe = FC([f_1; ...; f_H]) over the heads' pre-logits features
    (:class:`PeerEnsemble`, from ``make_modules(channels, heads, num_classes)``), and every *other*
    peer's temporal mean z'_l (its logits under EMA weights, on the same batch, detached).

    **What the trainer provides** (``headsurgeon.train``): ``features`` are the inputs of each head's
    classifier (timm's ``pretrained_cfg['classifier']``, caught by a forward pre-hook: the pooled
    pre-logits features), and the temporal mean is the run's EMA tree (:class:`timm.utils.ModelEmaV3`,
    decay ``ema_decay`` with the re-implementation's warm-up a = min(1 - 1/(step + 1), ema_decay)),
    updated after every optimiser step and saved/restored with the checkpoint. Each step the EMA tree
    runs on the batch in train mode under ``no_grad`` (as the re-implementation does: its BatchNorm
    statistics follow its own batches; ModelEmaV3 also averages them toward the live tree's at the
    EMA rate, which the re-implementation does not), and its per-head logits are ``mean_logits``.
    The exported head is that EMA tree's head ("we use a temporal mean model of a peer for
    deployment"): the trainer evaluates, chooses and saves the EMA tree.

    No official code exists (research notes §6); T=3, the 1/(H-1) and the EMA decay are the
    re-implementation's choices, not verified against the paper. The paper also gives each peer
    its own augmentation of the image; a tree gives every head the same batch. Its ramp bug is not
    reproduced (``ramp`` is ONE's ramp). With one head: plain CE.
    """
    name: ClassVar[str] = "pcl"
    feature_source: ClassVar[str | None] = "heads"
    needs_mean_logits: ClassVar[bool] = True
    temperature: float = 3.0
    ramp: int = 0
    ema_decay: float = 0.999
    label_smoothing: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.ema_decay < 1.0:
            raise HeadsurgeonError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        super().__post_init__()

    def make_modules(self, feature_channels: int | Sequence[int], heads: int,
                     num_classes: int | None = None) -> nn.Module | None:
        if heads < 2:
            return None
        if num_classes is None:
            raise HeadsurgeonError("objective 'pcl' needs num_classes for its peer ensemble classifier")
        return PeerEnsemble(feature_channels, heads, num_classes)

    def __call__(self, logits, target, features=None, modules=None, mean_logits=None) -> LossOut:
        if len(logits) == 1:
            return self._single(_check(logits, target, "pcl"), target)
        if features is None or modules is None or mean_logits is None:
            raise HeadsurgeonError("objective 'pcl' needs every head's pre-logits features, its PeerEnsemble "
                                   "and the temporal-mean (EMA) heads' logits in every call")
        return self.from_teachers(logits, target, modules(features), mean_logits)

    def from_teachers(self, logits: Sequence[torch.Tensor], target: torch.Tensor, ensemble_logits: torch.Tensor,
                      mean_logits: Sequence[torch.Tensor]) -> LossOut:
        """The loss for given peer-ensemble logits ``[B, C]`` and temporal-mean logits (one ``[B, C]`` per head)."""
        logits = _check(logits, target, "pcl")
        if len(logits) == 1:
            return self._single(logits, target)
        heads, w, T = len(logits), self.soft_weight, self.temperature
        if len(mean_logits) != heads:
            raise HeadsurgeonError(f"pcl needs {heads} temporal-mean logits, got {len(mean_logits)}")
        z_pe = _promote(ensemble_logits)
        means = [_promote(m).detach() for m in mean_logits]
        hard = [hard_ce(z, target, self.label_smoothing) for z in logits]
        teacher_ce = hard_ce(z_pe, target, self.label_smoothing)
        t = z_pe.detach()
        soft = [kl_t(z, t, T) + sum(kl_t(z, means[l], T) for l in range(heads) if l != i) / (heads - 1)
                for i, z in enumerate(logits)]
        loss = teacher_ce + sum(h + w * s for h, s in zip(hard, soft))
        return LossOut(loss, _detached(hard), _detached(soft), {"teacher_ce": teacher_ce.detach()})


#: the objectives headsurgeon ships (the recipe JSON schema's enum; OBJECTIVES also holds any registered later)
BUILTIN: tuple[str, ...] = tuple(sorted(OBJECTIVES))

"""The collaborative learning objective (Song & Chai 2018, eq. 2-4)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import HeadsurgeonError


def collaborative_loss(logits: Sequence[torch.Tensor], target: torch.Tensor, beta: float = 0.5,
                       temperature: float = 2.0, t2: bool = False, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum over heads of ``beta * CE(y, z_i) + (1 - beta) * softCE(q_i, z_i / T)``.

    ``q_i = softmax(mean_{j != i} z_j / T)`` is the consensus of the *other* heads, detached:
    each head is pulled towards its peers, never the peers towards it through q. The sum (not
    the mean) over heads is the paper's objective; the 1/fan-out that keeps shared layers at
    single-model gradient scale lives in the tree's rescaling ops. ``t2`` multiplies the soft
    term by T^2 (Hinton's correction; the paper does not say whether it uses it). One head:
    plain (optionally label-smoothed) cross-entropy.
    """
    if not 0.0 <= beta <= 1.0:
        raise HeadsurgeonError(f"beta must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise HeadsurgeonError(f"temperature must be > 0, got {temperature}")
    # soft terms in at least fp32: under fp16/bf16 autocast the logits arrive in half precision
    logits = [z.to(torch.promote_types(z.dtype, torch.float32)) for z in logits]
    heads = len(logits)
    if heads == 0:
        raise HeadsurgeonError("collaborative_loss needs at least one head's logits")
    hard = [F.cross_entropy(z, target, label_smoothing=label_smoothing) for z in logits]
    if heads == 1:
        return hard[0]
    scale = temperature * temperature if t2 else 1.0
    total = torch.stack(logits).sum(0).detach()
    loss = logits[0].new_zeros(())
    for z, ce in zip(logits, hard):
        q = F.softmax((total - z.detach()) / (heads - 1) / temperature, dim=1)
        soft = -(q * F.log_softmax(z / temperature, dim=1)).sum(1).mean()
        loss = loss + beta * ce + (1.0 - beta) * scale * soft
    return loss

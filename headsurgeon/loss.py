"""The collaborative learning objective (Song & Chai 2018, eq. 2-4)."""
from __future__ import annotations

from typing import Sequence

import torch

from .objectives import CL


def collaborative_loss(logits: Sequence[torch.Tensor], target: torch.Tensor, beta: float = 0.5,
                       temperature: float = 2.0, t2: bool = False, label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum over heads of ``beta * CE(y, z_i) + (1 - beta) * softCE(q_i, z_i / T)``.

    ``q_i = softmax(mean_{j != i} z_j / T)`` is the consensus of the *other* heads, detached:
    each head is pulled towards its peers, never the peers towards it through q. The sum (not
    the mean) over heads is the paper's objective; the 1/fan-out that keeps shared layers at
    single-model gradient scale lives in the tree's rescaling ops. ``t2`` multiplies the soft
    term by T^2 (Hinton's correction; the paper does not say whether it uses it). One head:
    plain (optionally label-smoothed) cross-entropy. ``target``: class indices or soft targets
    (``[B, C]`` probabilities). The ``cl`` objective of :mod:`headsurgeon.objectives`, which also
    returns the per-head terms.
    """
    return CL(beta=beta, temperature=temperature, t2=t2, label_smoothing=label_smoothing)(logits, target).loss

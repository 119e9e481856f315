"""Mode switching: :func:`train_mode` / :func:`eval_mode` are the one way the package switches a
module's mode for a while, and :func:`probe` the seeded batch every check runs a module on.

Floor 1 (torch only): tracing, split points, checks and training all switch modes.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def _mode(train: bool, modules: tuple[nn.Module, ...]) -> Iterator[None]:
    was = [m.training for m in modules]
    for m in modules:
        m.train(train)
    try:
        yield
    finally:
        for m, w in reversed(list(zip(modules, was))):  # the first module's mode wins where modules share children
            m.train(w)


def train_mode(*modules: nn.Module):
    """Put ``modules`` in train mode for the block and give each its own mode back after."""
    return _mode(True, modules)


def eval_mode(*modules: nn.Module):
    """Put ``modules`` in eval mode for the block and give each its own mode back after."""
    return _mode(False, modules)


def probe(input_size, seed: int, like: nn.Module, batch: int = 2) -> torch.Tensor:
    """A seeded random batch on ``like``'s device and dtype."""
    p = next(iter(like.parameters()))
    x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(seed))
    return x.to(device=p.device, dtype=p.dtype)

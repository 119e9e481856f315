"""headsurgeon: collaborative learning (Song & Chai, NeurIPS 2018) for the timm model zoo.

The public names are imported lazily (PEP 562), so that commands which never touch a model
(``headsurgeon push``, ``--help``) do not pay for importing torch and timm.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "HeadsurgeonError": "errors",
    "HeadTree": "tree",
    "split": "tree",
    "collapse": "collapse",
    "export": "collapse",
    "collaborative_loss": "loss",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'headsurgeon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

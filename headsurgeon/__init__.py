"""headsurgeon: collaborative learning (Song & Chai, NeurIPS 2018) for the timm model zoo."""
__version__ = "0.1.0"

# Imported eagerly on purpose: a lazy PEP 562 ``__getattr__`` loses to the import system, which
# rebinds ``headsurgeon.collapse`` to the submodule once anything imports ``headsurgeon.collapse``.
from .errors import HeadsurgeonError  # noqa: E402
from .tree import HeadTree, split  # noqa: E402
from .collapse import collapse, export  # noqa: E402
from .loss import collaborative_loss  # noqa: E402

__all__ = ["HeadTree", "HeadsurgeonError", "collaborative_loss", "collapse", "export", "split", "__version__"]

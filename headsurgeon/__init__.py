"""headsurgeon: collaborative learning (Song & Chai, NeurIPS 2018) for the timm model zoo."""
# Imported eagerly on purpose: a lazy PEP 562 ``__getattr__`` loses to the import system, which
# rebinds ``headsurgeon.collapse`` to the submodule once anything imports ``headsurgeon.collapse``.
from .version import __version__
from .errors import HeadsurgeonError
from .tree import HeadTree, SplitSpec, split
from .collapse import collapse, export
from .loss import collaborative_loss

__all__ = ["HeadTree", "HeadsurgeonError", "SplitSpec", "collaborative_loss", "collapse", "export", "split",
           "__version__"]

"""headsurgeon: collaborative learning (Song & Chai, NeurIPS 2018) for the timm model zoo."""
# Imported eagerly on purpose: a lazy PEP 562 ``__getattr__`` loses to the import system, which
# rebinds ``headsurgeon.collapse`` to the submodule once anything imports ``headsurgeon.collapse``.
from .version import __version__
from .errors import HeadsurgeonError
from .tree import HeadTree, SplitSpec, split
from .collapse import collapse, export
from .loss import collaborative_loss
from .objectives import OBJECTIVES, LossOut, Objective, register
from .task import CollaborativeTask, evaluate

__all__ = ["OBJECTIVES", "CollaborativeTask", "HeadTree", "HeadsurgeonError", "LossOut", "Objective", "SplitSpec",
           "collaborative_loss", "collapse", "evaluate", "export", "register", "split", "__version__"]

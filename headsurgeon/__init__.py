"""headsurgeon: collaborative learning (Song & Chai, NeurIPS 2018) for the timm model zoo."""
# Imported eagerly on purpose. ``collapse``/``export`` live in ``exporter``: a submodule of the same
# name would be rebound over the function by the import system once anything imported it.
from .version import __version__
from .errors import HeadsurgeonError
from .spec import SplitSpec
from .tree import HeadTree
from .surgery import split
from .exporter import collapse, export
from .loss import collaborative_loss
from .objectives import OBJECTIVES, LossOut, Objective, register
from .task import CollaborativeTask, evaluate

__all__ = ["OBJECTIVES", "CollaborativeTask", "HeadTree", "HeadsurgeonError", "LossOut", "Objective", "SplitSpec",
           "collaborative_loss", "collapse", "evaluate", "export", "register", "split", "__version__"]

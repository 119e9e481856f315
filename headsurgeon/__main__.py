"""``python -m headsurgeon``: the CLI, also the entry point for ``torchrun -m headsurgeon train ...``."""
import sys

from .cli import main

sys.exit(main())

"""``python -m headsurgeon``: the CLI, also the entry point for ``torchrun -m headsurgeon train ...``."""
import os
import sys

# ``-m`` puts the current folder first on sys.path, so a module file there (an ``evil.py`` beside a
# downloaded tree, a ``yaml.py``) would be imported in place of the one meant: by a tree's leaf modules,
# or any later import. Drop that entry, so that ``-m`` finds modules as the installed ``headsurgeon``
# script does (its sys.path[0] is its bin folder): from installed packages and PYTHONPATH only.
# Dropping it, rather than vetting each leaf module's file, also covers the CLI's own lazy imports.
# (What ``import headsurgeon`` imported before this ran, torch and timm, was found with the folder on
# the path; ``python -P`` or ``PYTHONSAFEPATH=1`` keeps it off from the start.)
try:
    _cwd = os.getcwd()
except OSError:  # the current folder was removed: nothing in it can be imported either
    _cwd = None
if not getattr(sys.flags, "safe_path", False) and sys.path and sys.path[0] in ("", _cwd):
    del sys.path[0]

from .cli import main

sys.exit(main())

"""Files on disk: atomic directory writes, the one "output must be new or empty" check, JSON, sha256, sizes.

Every directory headsurgeon writes (a tree, an exported model, a run's checkpoint) appears whole
or not at all: it is written into a hidden sibling and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import HeadsurgeonError


def check_output(target: str | os.PathLike, overwrite: bool = False,
                 fix: str = "pass --overwrite or choose another -o") -> None:
    """Refuse an output that cannot be written: a file, or a non-empty directory unless ``overwrite``.

    Callers run it before the work (so a long job fails early) and :func:`atomic_dir` runs it
    again before the write. ``fix`` is what the message tells the user to do.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise HeadsurgeonError(f"output '{target}' exists and is not a directory; choose another -o")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise HeadsurgeonError(f"output directory '{target}' is not empty; {fix}")


@contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to write into; it replaces ``target`` only if the block succeeds."""
    target = Path(target)
    check_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Indented, key-sorted JSON (stable diffs between runs)."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def human(n: float, unit: str = "") -> str:
    """A count as ``11.7M``; with ``unit="B"`` a file size as the Hub shows it (``512 B``, ``46.8 MB``)."""
    if unit:
        for prefix in ("", "k", "M", "G"):
            if n < 1000 or prefix == "G":
                return f"{n:.1f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
            n /= 1000
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{prefix}"
        n /= 1000
    return f"{n:.3g}P"

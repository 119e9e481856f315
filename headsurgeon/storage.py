"""Files on disk: atomic directory writes, the one "output must be new or empty" check, JSON, sha256, sizes.

Every directory headsurgeon writes (a tree, an exported model, a run's checkpoint) appears whole
or not at all: it is written into a hidden sibling and renamed into place.
"""
from __future__ import annotations

import errno
import functools
import glob
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
    check_writable(target)


def check_writable(target: str | os.PathLike) -> None:
    """``target`` (a directory, existing or not) can be created and written: its nearest existing
    ancestor is a directory in which a file can be made. Catches ``-o some_file/sub``, read-only or
    immutable folders and file systems before the work, not after it."""
    target = Path(target).absolute()
    anc = target
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise HeadsurgeonError(f"cannot create '{target}': '{anc}' is a file, not a directory; choose another -o")
    try:
        fd, probe = tempfile.mkstemp(prefix=".headsurgeon-probe.", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise HeadsurgeonError(f"cannot write to '{anc}' ({e.strerror or e}): a read-only or full file system, "
                               f"or no permission; choose another -o") from None


def check_space(target: str | os.PathLike, nbytes: int) -> None:
    """Refuse, before writing, ``nbytes`` that the file system holding ``target`` has no room for."""
    anc = Path(target).absolute()
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    free = shutil.disk_usage(anc).free
    if nbytes > free:
        raise HeadsurgeonError(f"'{target}' needs {human(nbytes, 'B')} but only {human(free, 'B')} is free there; "
                               f"free space or choose another -o")


def os_error(e: OSError, target: str | os.PathLike, after: str = "") -> HeadsurgeonError:
    """An ``OSError`` while writing ``target`` as one line (disk full, read-only, permission)."""
    what = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted"}.get(e.errno, e.strerror or str(e))
    return HeadsurgeonError(f"cannot write '{target}': {what}; {after or 'nothing was written there'}")


@contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to write into; it replaces ``target`` only if the block succeeds."""
    target = Path(target)
    check_output(target, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=target.parent))
    except OSError as e:
        raise os_error(e, target) from None
    try:
        yield tmp
    except OSError as e:  # a full disk mid-write: the old target (if any) is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(e, target, f"'{target}' was left as it was" if target.exists() else "") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)
    if not overwrite:  # rename() replaces only an absent or empty target: output another process wrote meanwhile stays
        try:
            os.rename(tmp, target)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise HeadsurgeonError(f"'{target}' was written by another process while this one worked; it was left "
                                       f"as it was and nothing was written: choose another -o") from None
            raise os_error(e, target) from None
        return
    if target.exists():
        if _exchange(tmp, target):  # one atomic step: target is the old or the new folder, never absent
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = _old(target)  # two steps: a kill between them leaves only .NAME.old, restored by the next write
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


@functools.cache
def _renameat2() -> Any:
    """libc's ``renameat2``, looked up once (every checkpoint overwrite uses it); None where there is none."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux ``renameat2(RENAME_EXCHANGE)``, which the standard library
    does not wrap); False where the OS or file system has no such call."""
    renameat2 = _renameat2()
    at_fdcwd, rename_exchange = -100, 2
    return renameat2 is not None and renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM  # exists, owned by someone else
    return True


def restore_replaced(target: Path) -> None:
    """Put back a ``target`` that a kill between the two renames of an overwrite left only as
    ``.NAME.old`` (finished work is never lost to a killed overwrite); remove a ``.NAME.old`` whose
    replacement did land."""
    old = _old(target)
    if old.is_dir():
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, target)


def remove_stale_temps(target: Path) -> None:
    """Remove the half-written temporary siblings of ``target`` (``.NAME.PID.*``) that a killed write left;
    those of a live process (another write in progress) are kept. A ``target`` that a kill mid-replace
    left only as ``.NAME.old`` is put back first (:func:`restore_replaced`)."""
    restore_replaced(target)
    for p in target.parent.glob(f".{glob.escape(target.name)}.*"):
        pid = p.name[len(target.name) + 2:].split(".")[0]
        if pid.isdigit() and p.is_dir() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = True) -> None:
    """Indented JSON (key-sorted by default: stable diffs), written atomically: readers see the old or
    the new file, never half of one."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file atomically (a hidden sibling renamed into place); a failed write leaves the old file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise os_error(e, path, f"'{path}' was left as it was" if path.exists() else "") from None


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

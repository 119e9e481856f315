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
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import HeadsurgeonError


NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits (bytes) of one path component and of a whole path (ENAMETOOLONG)


def path_name_problem(path: str | os.PathLike, what: str) -> str | None:
    """What is wrong with a path the file system cannot take (a component over NAME_MAX bytes, the whole
    at PATH_MAX or more: every later ``stat``, ``mkdir`` or ``open`` of it raises ENAMETOOLONG), or None."""
    raw = os.fsencode(path)
    long = next((c for c in raw.split(b"/") if len(c) > NAME_MAX), None)
    if long is not None:
        return (f"{what} has a name of {len(long)} bytes ('{long[:24].decode(errors='replace')}...'); the file "
                f"system takes at most {NAME_MAX} per name: choose a shorter one")
    if len(raw) >= PATH_MAX:
        return f"{what} is a path of {len(raw):,} bytes; the file system takes at most {PATH_MAX - 1}: choose a shorter one"
    return None


def check_path_name(path: str | os.PathLike, what: str = "output") -> None:
    problem = path_name_problem(path, f"{what} '{str(path)[:60]}...'" if len(str(path)) > 60 else f"{what} '{path}'")
    if problem:
        raise HeadsurgeonError(problem)


def check_output(target: str | os.PathLike, overwrite: bool = False,
                 fix: str = "pass --overwrite or choose another -o", probe: bool = True) -> None:
    """Refuse an output that cannot be written: a file, or a non-empty directory unless ``overwrite``.

    Callers run it before the work (so a long job fails early) and :func:`atomic_dir` runs it
    again before the write (without the writability ``probe``: its own first write says what is
    wrong, as one line naming the cause). ``fix`` is what the message tells the user to do.
    """
    check_path_name(target)
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise HeadsurgeonError(f"output '{target}' exists and is not a directory; choose another -o")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise HeadsurgeonError(f"output directory '{target}' is not empty; {fix}")
    if probe:
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


WRITE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EFBIG: "file too large (the file system's or the "
                "process's file-size limit, ulimit -f)", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EIO: "input/output error (a failing disk?)"}


def os_error(e: OSError, target: str | os.PathLike, after: str = "") -> HeadsurgeonError:
    """An ``OSError`` while writing ``target`` as one line (disk full, read-only, permission)."""
    what = WRITE_ERRORS.get(e.errno, e.strerror or str(e))
    err = HeadsurgeonError(f"cannot write '{target}': {what}; {after or 'nothing was written there'}")
    err.errno = e.errno  # for a caller that says what to do about it (fix_for)
    return err


def fix_for(e: OSError) -> str:
    """What to do about a failed write, by its cause: what a message says before "then ..."."""
    return {errno.EROFS: "make the file system writable again (remount it read-write)",
            errno.EFBIG: "raise the file-size limit (ulimit -f) or use another file system",
            errno.EACCES: "fix the folder's permissions", errno.EPERM: "fix the folder's permissions",
            errno.EIO: "check the disk"}.get(e.errno, "free space")


# what torch.save's C++ zip writer raises when its stream fails (a full disk, a read-only remount, ulimit -f)
_TORCH_WRITE = ("PytorchStreamWriter failed", "unexpected pos", "basic_ios::clear", "iostream error",
                "inline_container.cc")


def fs_errno(path: str | os.PathLike) -> int | None:
    """Why writes under ``path`` fail, as far as the file system says: read-only, or no free block or
    inode left (checked while the failed write's files still take their space); None if neither."""
    anc = Path(path).absolute()
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    try:
        st = os.statvfs(anc)
    except (OSError, AttributeError):
        return None
    if st.f_flag & getattr(os, "ST_RDONLY", 1):
        return errno.EROFS
    if st.f_bavail == 0 or (st.f_files and st.f_favail == 0):
        return errno.ENOSPC
    return None


def write_failure(e: BaseException, path: str | os.PathLike) -> OSError | None:
    """The ``OSError`` behind a failed write under ``path``, also where a library hides it: safetensors'
    ``SafetensorError`` ("I/O error: No space left on device (os error 28)"), torch.save's
    ``RuntimeError`` ("[enforce fail at inline_container.cc] unexpected pos"), or any error raised
    while the file system is full or read-only. None: not a failed write (a bug, bad input)."""
    if isinstance(e, OSError):
        return e
    if not isinstance(e, Exception) or isinstance(e, HeadsurgeonError):
        return None
    import re

    text = str(e)
    m = re.search(r"\(os error (\d+)\)", text)
    if m:
        return OSError(int(m.group(1)), os.strerror(int(m.group(1))))
    code = fs_errno(path)
    if code is None and isinstance(e, RuntimeError) and any(s in text for s in _TORCH_WRITE):
        import resource

        limited = resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY
        code = errno.EFBIG if limited else errno.EIO
    return OSError(code, os.strerror(code)) if code is not None else None


def check_not_link(target: str | os.PathLike) -> None:
    """Refuse an output folder that is a symbolic link: its replacement is renamed into place, which
    would replace the link itself, never fill the folder it points to."""
    target = Path(target)
    if target.is_symlink():
        raise HeadsurgeonError(f"output '{target}' is a symbolic link (to '{os.readlink(target)}'); the output folder is "
                               f"written whole and renamed into place, which would replace the link, not write "
                               f"where it points: give the real folder (-o {target.resolve()}) or another -o")


@contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to write into; it replaces ``target`` only if the block succeeds."""
    target = Path(target)
    check_not_link(target)
    check_output(target, overwrite, probe=False)
    kept = lambda: f"'{target}' was left as it was" if target.exists() else ""  # noqa: E731
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=target.parent))
    except OSError as e:  # e.g. a file system gone read-only since the checks before the work
        raise os_error(e, target, kept()) from None
    try:
        yield tmp
    except BaseException as e:  # a full disk mid-write: the old target (if any) is untouched
        failed = write_failure(e, tmp)  # judged before the half-written files are removed (they fill the disk)
        shutil.rmtree(tmp, ignore_errors=True)
        if failed is not None:
            raise os_error(failed, target, kept()) from None
        raise
    if not overwrite:  # rename() replaces only an absent or empty target: output another process wrote meanwhile stays
        try:
            os.chmod(tmp, 0o755)
            os.rename(tmp, target)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise HeadsurgeonError(f"'{target}' was written by another process while this one worked; it was left "
                                       f"as it was and nothing was written: choose another -o") from None
            raise os_error(e, target) from None
        return
    try:
        os.chmod(tmp, 0o755)
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
    except OSError as e:  # e.g. the file system went read-only between the write and the rename
        try:
            restore_replaced(target)
        except OSError:
            pass  # the next write to target puts .NAME.old back
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(e, target, kept()) from None


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


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot: ``/proc/PID/stat`` field 22), which with the
    PID names one process: a PID that a later process reuses comes with another start time. None where
    there is no ``/proc`` (macOS) or no such process."""
    try:
        stat_ = Path(f"/proc/{pid}/stat").read_text()
        return int(stat_[stat_.rindex(")") + 2:].split()[19])  # fields 3.. follow the command name "(...)"
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid: int, start: int | None = None) -> bool:
    """Process ``pid`` lives and, when ``start`` is given (from :func:`process_start`), is the same process
    that had that start time, not a later one that reuses its PID."""
    if not pid_alive(pid):
        return False
    now = process_start(pid) if start is not None else None
    return now is None or now == start


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


def check_file_output(target: str | os.PathLike) -> None:
    """Refuse a one-file output (``recipe -o FILE``) that exists and is not a regular file: a FIFO, a
    device, a socket or a directory. The rename of :func:`write_text` would replace it with a regular
    file (as root, ``-o /dev/null`` replaced /dev/null), or fail after the work. A symbolic link is
    allowed, with the policy :func:`write_text` always had: the link itself is replaced by the new
    file, and what it points to is never written through."""
    check_path_name(target)
    try:
        mode = os.lstat(target).st_mode
    except OSError:  # absent (or unreadable): the write itself says what is wrong
        return
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        return
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "not a regular file")
    raise HeadsurgeonError(f"output '{target}' is {kind}, not a regular file: writing the file would replace it; "
                           f"give -o the path of a regular file")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file atomically (a hidden sibling renamed into place); a failed write leaves the old file.
    ``path`` must be absent, a regular file or a symbolic link (replaced, not followed: :func:`check_file_output`)."""
    path = Path(path)
    check_file_output(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)  # a stale one, or a link or FIFO left there: never written through
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

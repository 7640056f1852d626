"""One run per output directory: an advisory lock (`fcntl.flock`) held for the run's life.

    with run_lock.hold(output_dir, what="experiments.macdrop run"):
        ...   # a second run on output_dir is refused meanwhile

The lock is the file `.<name>.lock` beside the directory (it survives the directory being swapped by an atomic
write, and `overwrite_output_dir` deleting what the directory holds). It records who holds it (pid, host, start
time, command line). A second run is refused with a DirectoryLockedError naming the first one; a lock left by a
run that died (the kernel releases an flock with its process, the record stays) is taken over with a warning
naming the dead run. Advisory: it keeps mwjax runs apart, not other programs. On a filesystem shared by
several hosts the lock is only as good as the filesystem's flock (NFS emulates it with POSIX locks; some
FUSE filesystems have none); where it is unavailable the run goes on with a warning.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


class DirectoryLockedError(RuntimeError):
    """Another run holds the output directory."""


def lock_path(directory: str | os.PathLike) -> Path:
    """The lock file of an output directory.

    Args:
      directory: the output directory (it need not exist).

    Returns:
      `.<name>.lock` beside `directory`, its symbolic links resolved (a link to a directory is that directory).
    """
    directory = Path(directory).resolve()
    return directory.with_name(f".{directory.name}.lock")


def _holder(what: str) -> dict:
    return {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:300]}


def _describe(holder: dict) -> str:
    return (f"{holder.get('what', 'run')}, pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}"
            + (f" ({holder['command']})" if holder.get("command") else ""))


def _read(fd: int) -> dict:
    """The record in the lock file ({} when empty or unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        record = json.loads(raw.decode())
        return record if isinstance(record, dict) else {}
    except ValueError:
        return {}


def _write(fd: int, record: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(record).encode())
    os.fsync(fd)


def _refuse_inside_a_held_directory(directory: str | os.PathLike, what: str) -> None:
    """A directory inside one that another run holds (a checkpoint_dir in its output_dir) is that run's too:
    DirectoryLockedError naming it. Each enclosing directory's lock is tried and let go at once."""
    for parent in Path(directory).resolve().parents[:-1]:  # not the root, which has no name to lock beside
        path = lock_path(parent)
        if not path.is_file():
            continue
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            raise DirectoryLockedError(
                f"{Path(directory).absolute()} lies inside {parent}, which is in use by another run "
                f"({_describe(_read(fd))}), so this {what} cannot use it: choose a directory outside it") from None
        except OSError:  # no file locks on that filesystem: nothing to learn
            pass
        finally:
            os.close(fd)


@contextlib.contextmanager
def hold(directory: str | os.PathLike, *, what: str = "run") -> Iterator[Path]:
    """Hold `directory`'s lock for the block (module doc).

    Args:
      directory: the output directory (it need not exist yet; its parent is created).
      what: the kind of run, for the messages ("experiments.macdrop run").

    Yields:
      The lock file's path.

    Raises:
      DirectoryLockedError: another live run holds it; the message names that run and what to do.
    """
    _refuse_inside_a_held_directory(directory, what)
    path = lock_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise DirectoryLockedError(
                f"{Path(directory).absolute()} is in use by another run ({_describe(_read(fd))}), so this {what} "
                "cannot use it. One run per output directory: wait for that run to finish, or choose another "
                "output directory") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning("%s: this filesystem has no file locks (%s); nothing keeps a second run out of %s", path,
                        e.strerror, directory)
            locked = False
        previous = _read(fd)
        if previous:
            log.warning("%s: taking over the lock of a run that is no longer running (%s)", Path(directory).absolute(),
                        _describe(previous))
        _write(fd, _holder(what))
        try:
            yield path
        finally:
            _write(fd, {})  # released cleanly: the next run finds no record to take over
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

"""Files and directories written atomically: a kill leaves the old version or the new one whole, never a mix.

One file: `atomic_file` / `write_text_atomically` (a temporary name in the same directory, renamed onto the
target when complete).

A directory (an HF export, a PEFT adapter, an orbax checkpoint, a report with its figures): `atomic_directory`
builds the whole output in a private sibling, `.<name>.tmp-<pid>-<host>`; once complete it is renamed to
`.<name>.new` (so a `.new` is always whole) and swapped in by two renames, the old directory moved to
`.<name>.old` first and removed last. A kill

- while the output is being built leaves the old directory untouched (the private sibling is removed by the
  next write, once its process is gone);
- between the two renames of the swap (no directory at the target, a `.new` and / or an `.old` beside it) is
  repaired by `recover`, which every reader and writer calls first: the complete `.new` is moved into place
  (else the `.old` is moved back);
- after the swap leaves a stale `.old`, which `recover` removes.

So the target always holds the old output or the new one, never files of both. Replacing a directory that
holds something else than what is being written (your home directory given as an export directory) is
refused: `replaces` names the files that show a directory is an earlier output of the same kind.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A file written under a temporary name and renamed onto `path` (atomic) when the block ends without error.

    Args:
      path: the file to write.

    Yields:
      `path` + ".partial", the file to write; removed if the block raises.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (`atomic_file`): a reader sees the old file or the new one whole.

    Args:
      path: the file to write.
      text: its new content.
    """
    with atomic_file(path) as partial:
        partial.write_text(text)


# ------------------------------------------------------------------------------------------- directories


def siblings(directory: str | os.PathLike) -> tuple[Path, Path]:
    """The two siblings of `directory` that a swap uses.

    Args:
      directory: the target of a directory-atomic write.

    Returns:
      (`.<name>.new`, `.<name>.old`): where a complete new version waits for the swap, and where the old one
      goes during it.
    """
    directory = Path(directory)
    return directory.with_name(f".{directory.name}.new"), directory.with_name(f".{directory.name}.old")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def staging_path(directory: str | os.PathLike) -> Path:
    """This process's private sibling of `directory`, in which a new version is built.

    Args:
      directory: the target of a directory-atomic write.

    Returns:
      `.<name>.tmp-<pid>-<host>` beside `directory`.
    """
    directory = Path(directory)
    return directory.with_name(f".{directory.name}.tmp-{os.getpid()}-{_host()}")


def _rename(src: Path, dst: Path) -> bool:
    """os.replace that tolerates another process having done it first (readers repair concurrently)."""
    try:
        os.replace(src, dst)
        return True
    except FileNotFoundError:
        return False
    except OSError:  # dst is a non-empty directory: someone else put a version in place
        if dst.exists():
            return False
        raise


def recover(directory: str | os.PathLike) -> Path:
    """Finish or undo a swap killed between its two renames and drop a stale `.old`.

    Called by every reader and writer before it looks at `directory`. Never touches a `.new` beside an existing
    directory (a writer may be about to swap it in) nor a writer's private staging directory.

    Args:
      directory: the target of a directory-atomic write (it need not exist).

    Returns:
      The absolute path of `directory`.
    """
    directory = Path(directory).absolute()
    new, old = siblings(directory)
    if not directory.exists():
        if new.is_dir():  # renamed to .new only once complete
            _rename(new, directory)
        if not directory.exists() and old.is_dir():
            _rename(old, directory)
    if directory.exists() and old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return directory


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(directory: str | os.PathLike) -> None:
    """Before a write: drop what killed writes left beside `directory`.

    That is the staging directories of processes of this host that are gone and a `.new` that never got swapped
    in (after `recover`, which swaps in a `.new` when the target is missing).

    Args:
      directory: the target of the coming write.
    """
    directory = recover(directory)
    new, _ = siblings(directory)
    staged = re.compile(rf"^\.{re.escape(directory.name)}\.tmp-(\d+)-{re.escape(_host())}(\..*)?$")
    if not directory.parent.is_dir():
        return
    for entry in directory.parent.iterdir():
        match = staged.match(entry.name)
        # a .new never swapped in, a .new that a tool (orbax) was still writing under its temporary name, and the
        # staging directories of dead processes
        if entry == new or entry.name.startswith(new.name + ".") or (match and not _alive(int(match.group(1)))):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def check_replaceable(directory: str | os.PathLike, replaces: Sequence[str], what: str) -> None:
    """Refuse to replace `directory` unless it is absent, empty, or holds a file matching one of the glob
    patterns `replaces` (an earlier `what`): FileExistsError naming what it holds.

    Args:
      directory: the target of a write.
      replaces: patterns of the files that mark an earlier output of the same kind ("config.json", ...).
      what: the kind of output, for the message ("an HF checkpoint").
    """
    directory = Path(directory)
    if not directory.exists():
        return
    if not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory: cannot write {what} there; choose "
                              "another path or delete it")
    names = sorted(entry.name for entry in directory.iterdir())
    if names and not any(fnmatch.fnmatch(name, p) for name in names for p in replaces):
        raise FileExistsError(
            f"{directory} holds {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}, which is not {what}: "
            f"writing {what} replaces the whole directory, so it refuses to; choose another (or an empty) "
            "directory, or delete this one")


def swap_in(new: Path, directory: Path) -> None:
    """Put a complete new version in place of `directory`: two atomic renames, the old version removed last.

    `recover` repairs a kill between the two renames.

    Args:
      new: the complete version, the `.new` sibling of `directory` (`siblings`).
      directory: the target; its current version (if any) is moved to `.<name>.old`, then removed.
    """
    _, old = siblings(directory)
    if directory.exists():
        os.replace(directory, old)
    if not _rename(new, directory) and not directory.exists():
        raise FileNotFoundError(f"{new} vanished before it was swapped in at {directory}")
    shutil.rmtree(old, ignore_errors=True)


def begin(directory: str | os.PathLike, *, replaces: Sequence[str] | None = (), what: str = "an output",
          create: bool = True) -> Path:
    """Start a directory-atomic write of `directory` (module doc); finish it with `commit`, or `abort`.

    Repairs and clears what killed writes left and refuses a directory that holds something else
    (`check_replaceable`).

    Args:
      directory: the target; its parents are created.
      replaces: glob patterns of the files of an earlier output of this kind (`check_replaceable`); None: no
        such check, for a writer that carries the directory's other files over (see `commit`).
      what: the kind of output, for error messages.
      create: make the staging directory (False: the caller creates it, e.g. an orbax save).

    Returns:
      This process's staging directory (`staging_path`).
    """
    directory = recover(directory)
    if replaces is not None:
        check_replaceable(directory, replaces, what)
    remove_stale(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(directory)
    shutil.rmtree(staging, ignore_errors=True)  # an aborted write of this very process
    if create:
        staging.mkdir()
    return staging


def commit(staging: Path, directory: str | os.PathLike, *, carry: Callable[[str], bool] | None = None) -> Path:
    """Swap the complete `staging` in as `directory` (the end of a write started by `begin`).

    Args:
      staging: the staging directory `begin` returned, now complete.
      directory: the target.
      carry: `carry(name)` says which entries of the current directory to keep, hard-linked into the new
        version first (another writer's files in a shared output directory); None keeps none.

    Returns:
      The absolute path of `directory`.
    """
    directory = Path(directory).absolute()
    if carry is not None and directory.is_dir():
        for entry in directory.iterdir():
            if carry(entry.name) and not (staging / entry.name).exists():
                _link(entry, staging / entry.name)
    new, _ = siblings(directory)
    os.replace(staging, new)  # complete: from here on `recover` rolls the write forward
    swap_in(new, directory)
    return directory


def abort(staging: Path) -> None:
    """Drop a staging directory that will not be committed (the target is untouched).

    Args:
      staging: the staging directory `begin` returned.
    """
    shutil.rmtree(staging, ignore_errors=True)


def _link(src: Path, dst: Path) -> None:
    """A hard link of `src` at `dst` (directories: a tree of links; symlinks as symlinks), a copy where the
    filesystem has no hard links."""
    def link(a, b):
        try:
            os.link(a, b, follow_symlinks=False)
        except OSError:
            shutil.copy2(a, b, follow_symlinks=False)

    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    else:
        link(src, dst)


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, *, replaces: Sequence[str] = (), what: str = "an output",
                     create: bool = True) -> Iterator[Path]:
    """Build a directory's new version beside it and swap it in when the block ends without error (module doc).

    Args:
      directory: the target; its parents are created.
      replaces: glob patterns of the files of an earlier output of this kind; an existing non-empty directory
        holding none of them is refused (`check_replaceable`) before anything is written.
      what: the kind of output, for error messages.
      create: make the staging directory (False: the block creates it, e.g. an orbax save, which refuses to
        write into an existing directory).

    Yields:
      The staging directory to fill. On an error or an interrupt it is removed and the target is untouched.
    """
    staging = begin(directory, replaces=replaces, what=what, create=create)
    try:
        yield staging
        commit(staging, directory)
    except BaseException:
        abort(staging)
        raise

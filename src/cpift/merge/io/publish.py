"""Publishing outputs without destroying anything cpift did not write (docs/safety.md#data-safety).

Every command that writes goes through this module:

- ``check_output`` / ``check_side_file``, before any work, on resolved paths (symlinks followed,
  ``..`` removed): an output may not be, contain or lie inside an input; a directory output may not
  be an existing non-directory (file, FIFO, device, socket) or a symbolic link; ``/``, the current
  directory, the home directory and their ancestors are never outputs.
- ``--overwrite`` replaces only an empty directory or one cpift published. The rule: every directory
  cpift publishes holds the marker file ``.cpift-output`` (a small JSON object); a directory without
  it is the user's, and is refused with or without ``--overwrite``. The marker lists every entry cpift
  wrote (merge/io/manifest.py); an output holding an entry it does not list is refused too, naming
  that entry, so ``--overwrite`` never deletes a file the user added.
- ``Publication`` builds a directory in the hidden sibling ``.NAME.cpift-partial`` under an exclusive,
  non-blocking ``fcntl.flock`` on its marker (a second run on the same output is refused at once:
  ``OutputBusyError``), and renames it into place last. An old output is first renamed aside to
  ``.NAME.cpift-old``, the new one renamed in, the old one removed last. A process killed between the
  two renames leaves NAME absent, the old complete output in ``.NAME.cpift-old`` and the new complete
  one in ``.NAME.cpift-partial``: rerunning the command finishes the swap (the old copy is removed only
  once the new output is in place), or ``mv .NAME.cpift-old NAME`` restores the old one.
- ``write_atomic`` writes a single file: temporary sibling, fsync, ``os.replace``.

Self-contained (standard library, cpift/errors.py and merge/io/manifest.py only), so any module may import it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
from pathlib import Path
from typing import Callable, Iterable, Iterator

from cpift.errors import OutputBusyError, OutputError, UnsafeOutputError
from cpift.merge.io.manifest import MARKER, entries, marker_text, unrecorded

MARKER_TEXT = marker_text()  # a partial directory's: the file list is written when it is published
LEGACY = ("cpift-resume.json",)  # what a partial directory of an older cpift holds

PathLike = str | os.PathLike


def resolved(path: PathLike) -> Path:
    """The absolute path with symlinks followed and ``..`` removed (the path need not exist)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def partial_dir(out: PathLike) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.cpift-partial"


def old_dir(out: PathLike) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.cpift-old"


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_protected(path: PathLike, *, what: str = "output") -> Path:
    """Refuse ``/``, the current directory, the home directory and every ancestor of those two.

    Raises:
        UnsafeOutputError: ``path`` is one of them.
    """
    real = resolved(path)
    home = os.environ.get("HOME")
    for name, special in (("the current directory", Path.cwd()), ("the home directory", home)):
        if special and _within(resolved(special), real):
            raise UnsafeOutputError(f"{path}: refusing to use {name} or one of its ancestors as the {what}; "
                                    f"choose a new directory")
    return real


def check_inputs(path: PathLike, inputs: Iterable[PathLike], *, what: str = "output") -> None:
    """Refuse an output that is, contains or lies inside any of ``inputs`` (compared resolved).

    Raises:
        UnsafeOutputError: naming the output and the input.
    """
    real = resolved(path)
    for item in inputs:
        if item is None:
            continue
        src = resolved(item)
        if _within(real, src) or _within(src, real):
            rel = "is" if real == src else "lies inside" if _within(real, src) else "contains"
            raise UnsafeOutputError(f"{path}: the {what} {rel} the input {item}; choose an {what} "
                                    f"outside every input")


def is_cpift_output(path: PathLike) -> bool:
    """A directory cpift published (or an empty one): ``--overwrite`` may replace it."""
    p = Path(path)
    try:
        if (p / MARKER).is_file():
            return True
        return not any(p.iterdir())
    except OSError:
        return False


def file_kind(mode: int) -> str:
    """What a path of this ``st_mode`` is, for messages: a directory, a FIFO, a device, a socket, a file."""
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a file")


def check_output(out: PathLike, *, overwrite: bool, inputs: Iterable[PathLike] = ()) -> Path:
    """Fail before any work if the directory ``out`` may not be written (module docstring's rules).

    Args:
        out: the output directory.
        overwrite: an existing cpift output (or empty directory) at ``out`` may be replaced.
        inputs: every path the command reads (models, shards, masks, data, recipe files).

    Returns:
        ``out`` as a Path.

    Raises:
        UnsafeOutputError: ``out`` is an input, inside or around one, protected, a non-directory, a
            symbolic link, or a directory cpift did not write (with ``--overwrite``).
        OutputError: ``out`` exists without ``overwrite``, or its parent does not exist.
    """
    out = Path(out)
    check_not_protected(out)
    check_inputs(out, inputs)
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeOutputError(f"{out}: the output is a symbolic link; cpift replaces only directories "
                                    f"it wrote: give the real path or a new directory")
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeOutputError(f"{out}: the output exists and is {file_kind(st.st_mode)}, not a directory; "
                                    f"choose a new directory")
        if not overwrite:
            raise OutputError(f"{out}: output already exists (pass --overwrite to replace an earlier cpift "
                              f"output, or choose a new directory)")
        if not is_cpift_output(out):
            raise UnsafeOutputError(f"{out}: refusing to replace a directory cpift did not write (it has no "
                                    f"{MARKER} marker and is not empty); move it away or choose a new directory")
        check_recorded(out)
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: parent directory of the output does not exist")
    for aside in (partial_dir(out), old_dir(out)):
        if os.path.lexists(aside) and not (aside.is_dir() and not aside.is_symlink()
                                          and (is_cpift_output(aside) or _legacy(aside))):
            raise UnsafeOutputError(f"{aside}: exists and was not written by cpift; move it away to write {out}")
    return out


def check_recorded(out: Path) -> None:
    """Refuse to replace the cpift output ``out`` while it holds an entry its marker does not list.

    Raises:
        UnsafeOutputError: naming the entry.
    """
    stray = unrecorded(out)
    if stray is not None:
        raise UnsafeOutputError(f"{stray}: not written by cpift (not listed in {out / MARKER}); --overwrite "
                                f"would delete it: move it out of {out} or choose a new directory")


def _legacy(path: Path) -> bool:
    return any((path / name).is_file() for name in LEGACY)


def check_side_file(path: PathLike, *, inputs: Iterable[PathLike] = ()) -> Path:
    """Fail before any work if the single file ``path`` may not be written.

    Raises:
        UnsafeOutputError: ``path`` is an input, holds one, is protected, or exists and is not a
            regular file (a directory, FIFO, device, socket).
        OutputError: its parent directory does not exist.
    """
    path = Path(path)
    check_not_protected(path, what="output file")
    check_inputs(path, inputs, what="output file")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UnsafeOutputError(f"{path}: exists and is {file_kind(st.st_mode)}, not a regular file; choose another "
                                f"file name")
    if not path.parent.is_dir():
        raise OutputError(f"{path.parent} does not exist (the parent directory of {path})")
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: PathLike, data: bytes | str, *, inputs: Iterable[PathLike] = ()) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling, fsync, ``os.replace``.

    A reader sees the old file or the new one, never a torn one; a symlink at ``path`` is replaced by
    the file, its target left alone.

    Raises:
        UnsafeOutputError, OutputError: as ``check_side_file``, or the write failed.
    """
    path = check_side_file(path, inputs=inputs)
    raw = data.encode() if isinstance(data, str) else bytes(data)
    tmp = path.with_name(f".{path.name}.cpift-tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
    _fsync_dir(path.parent)
    return path


class Publication:
    """One output directory being built in ``.NAME.cpift-partial``, locked, then renamed into place.

    ``begin`` creates (or, with ``keep``, reuses) the partial directory and locks its marker;
    ``commit`` publishes it; ``abort`` removes it (or, with ``keep_partial``, leaves it for a resume)
    and unlocks. Call ``check_output`` first.
    """

    def __init__(self, out: PathLike, *, overwrite: bool):
        self.out = Path(out)
        self.tmp = partial_dir(self.out)
        self.overwrite = overwrite
        self._fd: int | None = None
        self.created = False  # begin made the partial directory (no earlier run left one)

    def begin(self, *, keep: bool = False) -> Path:
        """Lock the partial directory; clear what an earlier run left unless ``keep`` (a resume).

        Raises:
            OutputBusyError: another cpift run holds the lock.
            UnsafeOutputError: the partial path holds something cpift did not write.
        """
        try:
            self.tmp.mkdir()
            self.created = True
        except FileExistsError:
            if self.tmp.is_symlink() or not self.tmp.is_dir() or not (is_cpift_output(self.tmp)
                                                                      or _legacy(self.tmp)):
                raise UnsafeOutputError(f"{self.tmp}: exists and was not written by cpift; move it away "
                                        f"to write {self.out}") from None
        except OSError as e:
            raise OutputError(f"{self.out}: cannot write the output: {e.strerror or e}") from None
        marker = self.tmp / MARKER
        fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The directory may have been published (renamed) between the open and the lock.
            if os.fstat(fd).st_ino != os.stat(marker).st_ino:
                raise BlockingIOError(errno.EWOULDBLOCK, "moved")
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            raise OutputBusyError(f"{self.out}: the output is in use by another cpift run (locked: {self.tmp}); "
                                  f"wait for it to finish or choose another output") from None
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, MARKER_TEXT.encode(), 0)
        if not keep:
            self.clear()
        return self.tmp

    def clear(self) -> None:
        """Empty the locked partial directory (what a run that died left; never a finished output)."""
        for entry in list(self.tmp.iterdir()):
            if entry.name == MARKER:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def commit(self, *, before_rename: Callable[[], None] | None = None) -> Path:
        """Rename the partial directory to ``out``; an old output is moved aside first, removed last.

        ``before_rename`` runs after the old output went aside, right before the new one goes in
        (the writer drops its resume manifest there).

        Raises:
            OutputError: ``out`` appeared meanwhile (without overwrite) or a rename failed.
        """
        out, old = self.out, old_dir(self.out)
        try:
            if os.path.lexists(out):
                if not self.overwrite or out.is_symlink() or not out.is_dir() or not is_cpift_output(out):
                    raise OutputError(f"{out}: output already exists (another run published it meanwhile); "
                                      f"the new output is kept in {self.tmp}")
                check_recorded(out)  # again: a file may have been added since check_output
                if os.path.lexists(old):
                    check_recorded(old)
                    shutil.rmtree(old)  # ours: a finished swap's leftover (check_output vetted it)
                os.replace(out, old)
            if before_rename is not None:
                before_rename()
            self._record()
            os.replace(self.tmp, out)
            _fsync_dir(out.parent)
            if os.path.lexists(old):  # ours, or left by a run killed between the two renames
                check_recorded(old)
                shutil.rmtree(old)
        except OSError as e:
            if isinstance(e, OutputError):
                raise
            raise OutputError(f"{out}: cannot write the output: {e.strerror or e}") from None
        finally:
            self._unlock()
        return out

    def _record(self) -> None:
        """Write the list of every entry of the finished partial directory into its (locked) marker."""
        text = marker_text(entries(self.tmp)).encode()
        if self._fd is None:
            (self.tmp / MARKER).write_bytes(text)
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text, 0)

    def abort(self, *, keep_partial: bool = False) -> None:
        """Remove the partial directory, unless ``keep_partial`` (left for ``--resume``); unlock."""
        if not keep_partial and self._fd is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._unlock()

    def _unlock(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


@contextlib.contextmanager
def publish_dir(out: PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Build a directory in a locked hidden sibling and publish it as ``out`` when the block ends.

    An exception inside the block removes the partial directory and leaves ``out`` as it was.

    Example:
        >>> with publish_dir(check_output("masks", overwrite=False), overwrite=False) as tmp:
        ...     (tmp / "a.safetensors").write_bytes(data)
    """
    pub = Publication(out, overwrite=overwrite)
    pub.begin()
    try:
        yield pub.tmp
    except BaseException:
        pub.abort()
        raise
    pub.commit()

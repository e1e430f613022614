"""Outputs: one lock per output, written beside their place and renamed into it.

Every command that writes a folder or file goes through here, so that:

- a run holds an exclusive lock on its output for its whole length (`hold_output`): a
  second run on the same output fails at once, naming the holder's pid;
- an output is built in a hidden sibling (`.NAME.tmp-*`), its files fsynced, and renamed
  into place only when complete (`write_atomically`, `atomic_file`); replacing an old
  output swaps the two in one step (renameat2 RENAME_EXCHANGE), so a kill at any moment
  leaves the old or the new output readable, never none; where the kernel cannot exchange,
  the old one waits as `.NAME.old-*` and the next run puts it back (`recover_leftovers`);
- `overwrite` replaces only a previous output of the same command, recognised by its
  marker file (`MARKER`, or the files older versions wrote), never an input, never a
  filesystem root or a home folder (`check_output`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from convcli import __version__
from convcli.errors import ConvcliError, UsageError

MARKER = ".convcli-output.json"
"""Written into every output folder: which command made it (so `overwrite` knows it)."""

_held: dict[Path, int] = {}  # lock file -> how many nested holds in this process


# -- what an output may be --------------------------------------------------------------------


def check_output(
    output: str | Path,
    command: str,
    *,
    overwrite: bool,
    inputs: Sequence[str | Path] = (),
    kind: str = "folder",
) -> None:
    """Refuse an output that would destroy something it should not, before any work.

    An existing output needs `overwrite`, and then must be a previous output of `command`
    (an empty folder is fine without it). `kind` is "folder" or "file".
    """
    path = Path(output)
    refuse_system_folder(path)
    refuse_to_replace_inputs(path, inputs)
    if not path.exists() and not path.is_symlink():
        return
    if kind == "folder" and path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return  # an empty folder: nothing to lose
    if not overwrite:
        raise ConvcliError(
            f"{path} already exists (pass `overwrite` to replace it)", param="overwrite"
        )
    if kind == "file":
        if not path.is_file() or path.is_symlink():
            raise ConvcliError(f"{path} is not a regular file; refusing to replace it")
        return
    if path.is_symlink() or not path.is_dir():
        raise ConvcliError(f"{path} is not a folder; refusing to replace it", param="output")
    if not is_output_of(path, command):
        raise ConvcliError(
            f"{path} is not a previous output of `convcli {command}` (no {MARKER}); "
            "refusing to delete it: choose another `output` or remove it yourself",
            param="output",
        )


def refuse_system_folder(path: Path) -> None:
    """A filesystem root or a home folder is never an output (`train -o /`, `-o ~`)."""
    resolved = path.expanduser().resolve()
    homes = {Path.home().resolve()}
    with contextlib.suppress(KeyError, RuntimeError):
        homes.add(Path(os.path.expanduser("~" + os.environ.get("USER", ""))).resolve())
    if resolved == Path(resolved.anchor) or resolved in homes:
        what = "a filesystem root" if resolved == Path(resolved.anchor) else "a home folder"
        raise UsageError(f"`output` {path} is {what}; give a folder of its own", param="output")


def refuse_to_replace_inputs(output: str | Path, inputs: Sequence[str | Path]) -> None:
    """An output that is, or contains, one of the inputs would destroy it."""
    out = Path(output).expanduser().resolve()
    for item in inputs:
        source = Path(item).expanduser().resolve()
        if out == source or out in source.parents:
            raise UsageError(f"`output` {output} would replace the input {item}", param="output")


def write_marker(folder: Path, command: str) -> None:
    data = {"command": command, "convcli_version": __version__}  # no time: same bytes
    (folder / MARKER).write_text(json.dumps(data) + "\n", encoding="utf-8")


def is_output_of(folder: Path, command: str) -> bool:
    """Whether `folder` is a previous output of `convcli command` (its marker says so, or
    it holds what that command wrote before markers existed)."""
    marker = _json(folder / MARKER)
    if marker is not None:
        return marker.get("command") == command
    if command == "prepare":
        return (_json(folder / "manifest.json") or {}).get("format") == "convcli-shards"
    if command in ("convert", "train-folder"):
        made_by = {"convert": "convert", "train-folder": "train"}[command]
        return (_json(folder / "convcli.json") or {}).get("made_by") == made_by
    if command == "train":
        return (folder / "train.yaml").is_file()
    return False


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- the lock ---------------------------------------------------------------------------------


def lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.lock"


@contextlib.contextmanager
def hold_output(output: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `output` (a `.NAME.lock` sibling) for the block.

    A second holder, in this or another process, fails at once with a line naming the pid
    that holds it. Nested holds of one output in one process are fine. The lock dies with
    its process (flock), so a killed run never leaves a stale lock behind.
    """
    output = Path(output).absolute()
    lock = lock_path(output)
    if lock in _held:
        _held[lock] += 1
        try:
            yield
        finally:
            _held[lock] -= 1
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    handle = _acquire(lock, output)
    _held[lock] = 1
    try:
        yield
    finally:
        del _held[lock]
        # Unlink while holding: a waiter that opened the old file notices (see _acquire).
        with contextlib.suppress(OSError):
            lock.unlink()
        handle.close()


def _acquire(lock: Path, output: Path) -> IO[str]:
    for _ in range(10):
        try:
            handle = open(lock, "a+", encoding="utf-8")  # noqa: SIM115 (held for the run)
        except OSError as exc:  # a read-only or foreign folder: name it, not our lock file
            raise OSError(exc.errno, exc.strerror, str(output.parent)) from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                handle.close()
                raise
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ConvcliError(
                f"{output} is in use by another convcli run (pid {holder}); wait for it to "
                "finish or choose another `output`",
                param="output",
            ) from None
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed this file as we opened it: again
            handle.close()
            continue
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return handle
    raise ConvcliError(f"{output}: could not take the lock {lock}")


# -- leftovers of killed runs -----------------------------------------------------------------


def recover_leftovers(output: str | Path) -> list[str]:
    """Clean what a killed run left beside `output`; call it holding the lock.

    `.NAME.tmp-*` are unfinished (or, after an exchange, the replaced old output): removed.
    `.NAME.old-*` is a complete old output set aside during a swap: put back when `output`
    is missing, else removed. Returns what was done, for the user.
    """
    output = Path(output).absolute()
    parent = output.parent
    done: list[str] = []
    if not parent.is_dir():
        return done
    for old in sorted(parent.glob(f".{glob.escape(output.name)}.old-*")):
        inner = old / output.name  # older convcli nested the old output one level down
        candidate = inner if old.is_dir() and inner.exists() else old
        if not output.exists() and not output.is_symlink():
            os.rename(candidate, output)
            done.append(f"restored {output} from an interrupted replacement")
            if candidate is not old:
                shutil.rmtree(old, ignore_errors=True)
        else:
            _remove(old)
            done.append(f"removed {old.name}, left by an interrupted replacement")
    for tmp in sorted(parent.glob(f".{glob.escape(output.name)}.tmp-*")):
        _remove(tmp)
        done.append(f"removed {tmp.name}, left by an interrupted run")
    return done


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


# -- atomic writes ----------------------------------------------------------------------------


def write_atomically(
    output: str | Path,
    write: Callable[[Path], None],
    *,
    overwrite: bool = False,
    command: str | None = None,
) -> Path:
    """Build a folder in a hidden sibling and move it into place when complete.

    `write(tmp)` fills the folder. With `command`, the folder gets its marker and an
    existing output must be a previous output of that command. The old output (with
    `overwrite`) stays readable until the new one replaces it in one step.
    """
    output = Path(output)
    with hold_output(output):
        recover_leftovers(output)
        if command is not None:
            check_output(output, command, overwrite=overwrite)
        elif _occupied(output) and not overwrite:
            raise ConvcliError(
                f"{output} already exists (pass `overwrite` to replace it)", param="overwrite"
            )
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        try:
            with named_os_errors(output):
                write(tmp)
                if command is not None:
                    write_marker(tmp, command)
                for file in tmp.rglob("*"):  # safetensors (via tempfile) makes 0600 files
                    if file.is_file():
                        file.chmod(0o666 & ~umask)
                sync_tree(tmp)
                _move_into_place(tmp, output, overwrite=overwrite)
        except BaseException:
            _remove(tmp)
            raise
    return output


def _occupied(path: Path) -> bool:
    """Exists and is not an empty folder (an empty folder is a fine place for an output)."""
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()


def _move_into_place(tmp: Path, output: Path, *, overwrite: bool) -> None:
    if _occupied(output):
        if not overwrite:  # someone made it while we worked: never replace it silently
            raise ConvcliError(
                f"{output} appeared while this run worked; nothing replaced (pass "
                "`overwrite` to replace it)",
                param="overwrite",
            )
        if output.is_dir() and not output.is_symlink() and exchange(tmp, output):
            _remove(tmp)  # the old output, now under the temporary name
            fsync_dir(output.parent)
            return
        # Two renames: a kill between them leaves `.NAME.old-*`, restored by the next run.
        old = output.parent / f".{output.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
        os.rename(output, old)
        os.rename(tmp, output)
        fsync_dir(output.parent)
        _remove(old)
        return
    if output.is_dir() and not output.is_symlink():
        output.rmdir()  # empty: rename would replace it anyway, but say so plainly
    if not rename_noreplace(tmp, output):
        os.rename(tmp, output)
    fsync_dir(output.parent)


@contextlib.contextmanager
def atomic_file(
    output: str | Path, overwrite: bool = False, *, encoding: str = "utf-8"
) -> Iterator[IO[str]]:
    """A text file written as `.NAME.tmp-*` beside `output` and renamed into place when the
    block ends without error; on error (or a kill) `output` is untouched."""
    output = Path(output)
    with hold_output(output):
        recover_leftovers(output)
        if _occupied(output) and not overwrite:
            raise ConvcliError(
                f"{output} already exists (pass `overwrite` to replace it)", param="overwrite"
            )
        output.parent.mkdir(parents=True, exist_ok=True)
        with named_os_errors(output):
            fd, name = tempfile.mkstemp(prefix=f".{output.name}.tmp-", dir=output.parent)
        tmp = Path(name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(fd, 0o666 & ~umask)
        try:
            with named_os_errors(output), open(fd, "w", encoding=encoding) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            with named_os_errors(output):
                if overwrite or not output.exists():
                    if overwrite or not rename_noreplace(tmp, output):
                        os.replace(tmp, output)
                else:
                    raise ConvcliError(
                        f"{output} appeared while this run worked; nothing replaced",
                        param="overwrite",
                    )
                fsync_dir(output.parent)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


@contextlib.contextmanager
def replaced_in_one_step(path: str | Path, *, prefix: str | None = None) -> Iterator[IO[bytes]]:
    """A binary file that replaces `path` in one step when the block ends without error (a
    temp file beside it, fsynced, then renamed); on error or a kill `path` is untouched and
    only a temp file named `prefix` + ... can be left (for the caller's cleanup)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=prefix or f".{path.name}.tmp-", dir=path.parent)
    try:
        with named_os_errors(path), open(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    fsync_dir(path.parent)


# -- the system calls -------------------------------------------------------------------------

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False when this kernel, libc or filesystem cannot do it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step; False where unsupported (then the caller renames)."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename unless `dst` exists (EEXIST); False where unsupported."""
    return _renameat2(src, dst, _RENAME_NOREPLACE)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def start_writeback(path: Path) -> None:
    """Ask the kernel to start writing `path` to disk, from a background thread (Linux
    only), and return at once.

    Queuing a file's pages for writing takes the caller ~0.4 s per GB here; on its own
    thread that runs beside the caller's next steps (the rest of the folder, verifying),
    and the fsync before the rename (`sync_tree`) finds little left to write. Best
    effort: the fsync is what makes the file durable.
    """
    if not sys.platform.startswith("linux"):
        return

    def queue() -> None:
        with contextlib.suppress(OSError, AttributeError):
            fd = os.open(path, os.O_RDONLY)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                # sync_file_range(fd, 0, 0 = to the end, SYNC_FILE_RANGE_WRITE = 2)
                libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), ctypes.c_uint(2))
            finally:
                os.close(fd)

    threading.Thread(target=queue, name="convcli-writeback", daemon=True).start()


def sync_tree(root: Path) -> None:
    """fsync every file and folder under `root`: renamed into place means on disk."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


# -- OS errors, named -------------------------------------------------------------------------


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # tokenizers', safetensors' io errors


@contextlib.contextmanager
def named_os_errors(path: Path) -> Iterator[None]:
    """OS errors without a file name (a full disk during a write) get `path` as theirs,
    so that the CLI's one line can name where it happened. Libraries written in Rust
    (tokenizers, safetensors) raise theirs as plain exceptions "... (os error 28)"; torch
    says "file write failed": both become the OSError they are."""
    try:
        yield
    except OSError as exc:
        # numpy's tofile says only "58800 requested and 53248 written" on a full disk
        code = exc.errno if exc.errno is not None else _disk_full(path)
        if exc.filename is None and code is not None:
            raise OSError(code, exc.strerror or os.strerror(code), str(path)) from exc
        raise
    except Exception as exc:
        code = _os_error_code(exc, path)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from exc


def _os_error_code(exc: Exception, path: Path) -> int | None:
    found = _RUST_OS_ERROR.search(str(exc))
    if found:
        return int(found.group(1))
    if isinstance(exc, RuntimeError) and "write" in str(exc).lower():
        return _disk_full(path)
    return None


def _disk_full(path: Path) -> int | None:
    """ENOSPC when the filesystem of `path` has (next to) no room left, else None."""
    with contextlib.suppress(OSError, StopIteration):
        where = next(p for p in (path, *path.parents) if p.exists())
        if shutil.disk_usage(where).free < 2**20:
            return errno.ENOSPC
    return None

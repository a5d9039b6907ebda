"""Writing a file so that no reader ever sees half of it, and holding an output folder against a second writer.

    with atomic_write(path, "wb", fsync=True) as f:   # f is open on `.<name>.<pid>.tmp` next to `path`
        f.write(data)                                 # `path` appears, whole, when the block ends
    write_json_atomic(path, obj)                      # the same for text and JSON
    with atomic_path(path) as tmp:                    # for writers that open the file themselves (ffmpeg, memmap)
        run_writer(tmp)

The temporary name is hidden, unique per process and ends in `.tmp`, so no reader's pattern (`*.tar`, `*.npy`,
`rank*-*.npz`) matches it and two processes never write the same one. On success it is renamed over `path`; on
any failure it is removed, and an OSError that names no file (or only the temporary one) is re-raised naming
`path` ("No space left on device" alone does not say where). `output_lock` makes a second vatp process writing
the same folder fail in one line. Standard library only: `data_prep/` and `eval/` use this module without the
rest of `pipeline/`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

LOCK = ".lock"


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files of `path` that a killed writer may have left: this module's `.<name>.<pid>.tmp`, and the
    `<name>.tmp` / `<name>.<pid>.tmp` that vatp wrote before it."""
    path = Path(path)
    name = glob.escape(path.name)
    patterns = (f".{name}.*.tmp", f"{name}.tmp", f"{name}.*.tmp")
    return sorted({p for pattern in patterns for p in path.parent.glob(pattern)})


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, exclusive: bool = False) -> Iterator[Path]:
    """A temporary path next to `path` to write; it becomes `path` when the block ends, and is removed if it raises.

    With `exclusive`, an existing `path` is kept and FileExistsError raised (a hard link, not a rename; on a
    filesystem without hard links the last writer wins).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        _move(tmp, path, exclusive=exclusive)
    except OSError as e:
        _remove_quietly(tmp)
        raise _naming(e, path, tmp) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike, mode: str = "w", *, fsync: bool = False, exclusive: bool = False
) -> Iterator[IO]:
    """A file open for writing (`mode` "w": UTF-8 text, or "wb") that becomes `path` whole when the block ends.

    `fsync` flushes the data to the disk before the rename (for files a crash must not leave empty); `exclusive`
    as in `atomic_path`.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path, exclusive=exclusive) as tmp:
        with open(tmp, mode, encoding=None if mode == "wb" else "utf-8") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_write`."""
    with atomic_write(path, fsync=fsync) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj: object, *, exclusive: bool = False) -> None:
    """Write `obj` as indented UTF-8 JSON (one space per level, a final newline) to `path` through `atomic_write`."""
    with atomic_write(path, exclusive=exclusive) as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def _move(tmp: Path, path: Path, *, exclusive: bool) -> None:
    if not exclusive:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if `path` exists, unlike a rename
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: last writer wins
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _naming(error: OSError, path: Path, tmp: Path) -> OSError:
    """`error` naming `path` where it names no file or only the temporary one (a failed write() names none)."""
    if error.filename and error.filename != str(tmp):
        return error
    return OSError(error.errno, error.strerror, str(path))


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@contextlib.contextmanager
def output_lock(out: str | os.PathLike, *, part: int | None = None) -> Iterator[None]:
    """Hold `<out>/.lock` while writing `out`, so a second vatp process writing there is refused in one line.

    The lock is exclusive (`fcntl.flock`, non-blocking); part `I` of a job array instead shares `.lock` with the
    other parts and holds `.lock.part<I>` exclusively, so parts run side by side but a whole build, or the same
    part twice, does not. The holder's pid is in the file it holds exclusively. The lock goes with the process,
    so a killed run leaves nothing to clean up. On a filesystem without locks the run goes on, unprotected.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mine = out / (LOCK if part is None else f"{LOCK}.part{part}")
    with contextlib.ExitStack() as stack:
        if part is not None:
            _flock(out, out / LOCK, stack.enter_context(open(out / LOCK, "a+b")), fcntl.LOCK_SH)
        f = stack.enter_context(open(mine, "a+b"))
        if _flock(out, mine, f, fcntl.LOCK_EX):
            f.truncate(0)
            f.write(f"{os.getpid()}\n".encode())
            f.flush()
            stack.callback(f.truncate, 0)  # runs before the file closes (and the lock goes)
        yield


def _flock(out: Path, path: Path, f, kind: int) -> bool:
    """Lock `f` without waiting; False where the filesystem has no locks. A held lock is a one-line ValueError."""
    try:
        fcntl.flock(f.fileno(), kind | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(
            f"{out} is being written by another vatp process (pid {_lock_holder(out, path)}): "
            "wait for it or choose another --out"
        ) from None
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        log.warning("%s: the filesystem does not support locks (%s); nothing stops two runs writing it at once", out, e)
        return False
    return True


def _lock_holder(out: Path, first: Path) -> str:
    """The pid written in lock file `first`, else in another of `out`'s, or '?' (the holder has not written it yet)."""
    for path in [first, out / LOCK, *sorted(out.glob(f"{LOCK}.part*"))]:
        try:
            pid = path.read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            continue
        if pid:
            return pid
    return "?"

"""Deterministic, atomic WebDataset tar writing: same samples in, byte-identical shard out.

Members are sorted by key then extension and carry fixed metadata (mtime, owner, mode), so a re-run
reproduces a shard exactly. The tar is written to `<name>.tmp` and renamed when complete, so readers
never see a truncated shard. Names, keys and every reader of the format are in `pipeline/dataset.py`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable

from pipeline.dataset import MEMBERS

log = logging.getLogger(__name__)

FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z: any constant works, a plausible date keeps tools quiet


def write_shard(path: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write `samples` (key, {extension: bytes}) to the tar at `path` atomically; returns the byte size."""
    members = sorted((key, ext, data) for key, files in samples for ext, data in files.items())
    keys = [(key, ext) for key, ext, _ in members]
    assert len(set(keys)) == len(keys), "duplicate key.extension in one shard"
    foreign = sorted({ext for _, ext in keys} - set(MEMBERS))
    assert not foreign, f"member extensions {foreign} are not in the dataset format {MEMBERS}"
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, ext, data in members:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    info.mtime = FIXED_MTIME
                    info.mode = 0o444
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise _naming(e, path) from None
    return os.path.getsize(path)


def _naming(error: OSError, path: str) -> OSError:
    """`error` with the file it concerns (a failed write() names none: "No space left on device" alone)."""
    return error if error.filename else OSError(error.errno, error.strerror, path)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_json_atomic(path: str, obj: object) -> None:
    """Write `obj` as indented JSON to `path` via a temporary file (unique per process) and a rename."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise _naming(e, path) from None


def encode_sample_json(meta: dict) -> bytes:
    """Sample metadata as compact UTF-8 JSON with sorted keys (stable bytes across runs)."""
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

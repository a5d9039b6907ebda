"""Deterministic, atomic WebDataset tar writing: same samples in, byte-identical shard out.

Members are sorted by key then extension and carry fixed metadata (mtime, owner, mode), so a re-run
reproduces a shard exactly. The tar is written to `<name>.tmp` and renamed when complete, so readers
never see a truncated shard. Reading back: `read_dataset_json` (checked format/version) and
`iter_json_members` (sample metadata only: stdlib tarfile + json.loads, nothing unpickled).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT_NAME = "vatp-shards"
FORMAT_VERSION = 1
FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z: any constant works, a plausible date keeps tools quiet


def shard_name(index: int) -> str:
    """`000042.tar` for shard 42."""
    return f"{index:06d}.tar"


def sample_key(idx: int) -> str:
    """The WebDataset key of sample `idx`: zero-padded, dot-free, sorts like the integer."""
    return f"{idx:09d}"


def write_shard(path: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write `samples` (key, {extension: bytes}) to the tar at `path` atomically; returns the byte size."""
    members = sorted((key, ext, data) for key, files in samples for ext, data in files.items())
    keys = [(key, ext) for key, ext, _ in members]
    assert len(set(keys)) == len(keys), "duplicate key.extension in one shard"
    tmp = path + ".tmp"
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
    return os.path.getsize(path)


def write_json_atomic(path: str, obj: object) -> None:
    """Write `obj` as indented JSON to `path` via a temporary file (unique per process) and a rename."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def encode_sample_json(meta: dict) -> bytes:
    """Sample metadata as compact UTF-8 JSON with sorted keys (stable bytes across runs)."""
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def read_dataset_json(dataset_dir: str | os.PathLike) -> dict:
    """`<dataset_dir>/dataset.json`, checked to be a `vatp-shards` version 1 description; ValueError otherwise."""
    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        raise ValueError(f"{path} not found (not a dataset, or the build has not finished every part)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        found = (meta.get("format"), meta.get("version"))
        raise ValueError(f"{path}: format/version {found}, expected {(FORMAT_NAME, FORMAT_VERSION)}")
    if not isinstance(meta.get("shards"), list):
        raise ValueError(f"{path}: 'shards' is missing or not a list")
    return meta


def iter_json_members(tar_path: str | os.PathLike, *, bad: list[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(key, metadata) of every `<key>.json` member of a shard, in tar order; other members are not read.

    One sequential pass over the tar. A member that is not a JSON object is skipped with a warning
    and, when `bad` is given, its name appended to it; an unreadable tar raises ValueError.
    """
    try:
        with tarfile.open(tar_path, mode="r|") as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".json"):
                    continue
                f = tar.extractfile(member)
                try:
                    meta = json.loads(f.read()) if f is not None else None
                except (json.JSONDecodeError, UnicodeDecodeError):
                    meta = None
                if isinstance(meta, dict):
                    yield member.name[: -len(".json")], meta
                    continue
                log.warning("%s: member %s is not a JSON object; skipped", tar_path, member.name)
                if bad is not None:
                    bad.append(member.name)
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{tar_path}: not a readable tar file: {e}") from e

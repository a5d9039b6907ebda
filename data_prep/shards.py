"""Deterministic, atomic WebDataset tar writing: same samples in, byte-identical shard out.

Members are sorted by key then extension and carry fixed metadata (mtime, owner, mode), so a re-run
reproduces a shard exactly. The tar is written to `<name>.tmp` and renamed when complete, so readers
never see a truncated shard. Reading back: `read_dataset_json` (checked format/version),
`iter_tar_members` (the members a caller asks for, as bytes; nothing else is read) and `iter_json_members`
(sample metadata only: json.loads, nothing unpickled).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

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


TAR_BLOCK = 512
REGULAR_TYPES = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file


def iter_tar_members(stream: BinaryIO, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular member of an uncompressed tar stream whose name `wanted` accepts, in order;
    the data of every other member is skipped unread.

    A lean reader for the loader's hot path (Python's tarfile costs ~1 ms per sample there): ustar headers with
    their checksum checked, GNU long names and pax `path`/`size` records; the stream ends at a zero block or
    at its end. A bad checksum, a truncated member or an unsupported header raises ValueError.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = stream.read(TAR_BLOCK)
        if not header or header == bytes(TAR_BLOCK):
            return
        if len(header) < TAR_BLOCK:
            raise ValueError("truncated tar header")
        _check_tar_checksum(header)
        kind = header[156:157]
        size = int(pax.get("size", "")) if "size" in pax else _tar_number(header[124:136])
        name = long_name or pax.get("path") or _tar_name(header)
        if kind in (b"L", b"x"):  # GNU long name / pax extended header: it describes the next member
            data = _read_exact(stream, size, name)
            _skip(stream, -size % TAR_BLOCK)
            if kind == b"L":
                long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            else:
                pax = _pax_records(data)
            continue
        if kind in (b"K", b"g"):  # GNU long link name, pax global header: nothing the loader uses
            _skip(stream, size + -size % TAR_BLOCK)
            continue
        long_name, pax = None, {}
        if kind in REGULAR_TYPES and not name.endswith("/") and wanted(name):  # "x/": an old-style folder
            data = _read_exact(stream, size, name)
            _skip(stream, -size % TAR_BLOCK)
            yield name, data
        else:
            _skip(stream, size + -size % TAR_BLOCK)


def _tar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _check_tar_checksum(header: bytes) -> None:
    try:
        stored = _tar_number(header[148:156])
    except ValueError:
        stored = -1
    computed = sum(header[:148]) + 8 * 32 + sum(header[156:])  # the checksum field counts as spaces
    if stored != computed:
        raise ValueError("bad tar header checksum (not a tar file, or corrupt)")


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return records


def _read_exact(stream: BinaryIO, size: int, name: str) -> bytes:
    data = stream.read(size)
    if len(data) < size:
        raise ValueError(f"truncated tar member {name!r}: {len(data)} of {size} bytes")
    return data


def _skip(stream: BinaryIO, size: int) -> None:
    if size <= 0:
        return
    if stream.seekable():
        stream.seek(size, io.SEEK_CUR)
    else:
        while size > 0:
            chunk = stream.read(min(size, 1 << 20))
            if not chunk:
                raise ValueError("truncated tar stream")
            size -= len(chunk)


def iter_json_members(tar_path: str | os.PathLike, *, bad: list[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(key, metadata) of every `<key>.json` member of a shard, in tar order; other members are not read.

    One sequential pass over the tar. A member that is not a JSON object is skipped with a warning
    and, when `bad` is given, its name appended to it; an unreadable tar raises ValueError.
    """
    try:
        with open(tar_path, "rb") as f:
            for name, data in iter_tar_members(f, lambda name: name.endswith(".json")):
                try:
                    meta = json.loads(data)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    meta = None
                if isinstance(meta, dict):
                    yield name[: -len(".json")], meta
                    continue
                log.warning("%s: member %s is not a JSON object; skipped", tar_path, name)
                if bad is not None:
                    bad.append(name)
    except (ValueError, OSError) as e:
        raise ValueError(f"{tar_path}: not a readable tar file: {e}") from e

"""Deterministic, atomic WebDataset tar writing: same samples in, byte-identical shard out.

Members are sorted by key then extension and carry fixed metadata (mtime, owner, mode), so a re-run
reproduces a shard exactly. The tar is written to a temporary name and renamed when complete
(`pipeline.files.atomic_write`), so readers never see a truncated shard. Names, keys and every reader of the
format are in `pipeline/dataset.py`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable

from pipeline.dataset import MEMBERS
from pipeline.files import atomic_write

log = logging.getLogger(__name__)

FIXED_MTIME = 946684800  # 2000-01-01T00:00:00Z: any constant works, a plausible date keeps tools quiet


def write_shard(path: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write `samples` (key, {extension: bytes}) to the tar at `path` atomically; returns the byte size."""
    members = sorted((key, ext, data) for key, files in samples for ext, data in files.items())
    keys = [(key, ext) for key, ext, _ in members]
    assert len(set(keys)) == len(keys), "duplicate key.extension in one shard"
    foreign = sorted({ext for _, ext in keys} - set(MEMBERS))
    assert not foreign, f"member extensions {foreign} are not in the dataset format {MEMBERS}"
    with atomic_write(path, "wb", fsync=True) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = FIXED_MTIME
                info.mode = 0o444
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return os.path.getsize(path)


def encode_sample_json(meta: dict) -> bytes:
    """Sample metadata as compact UTF-8 JSON with sorted keys (stable bytes across runs)."""
    return json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

"""The dataset on disk as every part of vatp reads and writes it (DESIGN.md, "Dataset on disk"): one home for the
format.

`dataset.json` (its builder, its reader and its shard list), the file names beside it (`stats/`, `failures.jsonl`,
`plan.json`, the tokenizer), the fields of a sample's json, the tar member extensions a reader may touch, sample
keys, one tar member reader (no Python `tarfile`, nothing unpickled), where a run finds its tokenizer, and
encoding with it. The loader, embedding, the report, `vatp data build` and `inspect`, the shard writer and
tokenizer training all go through this module. Of vatp it imports only `models.contracts` (the tokenizer's pad id
is the text towers' input contract), so `data_prep/` can use it without the rest of `pipeline/`.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from models.contracts import PAD_ID

log = logging.getLogger(__name__)

FORMAT_NAME = "vatp-shards"
FORMAT_VERSION = 1
DATASET_JSON = "dataset.json"
SHARDS_DIR = "shards"
STATS_DIR = "stats"  # one `stats_name(shard)` per finished shard: its presence marks the shard done
FAILURES_JSONL = "failures.jsonl"  # one line per input skipped (or kept despite a problem, `"kept": true`)
PLAN_JSON = "plan.json"  # the build's probes and options, so resumes and job-array parts plan alike
TOKENIZER_NAME = "tokenizer.model"
UNK_ID = 1  # the tokenizer's id for unknown pieces; padding is `PAD_ID`, the text towers' contract

# The fields of every sample's `<key>.json` and the types they may hold (`vatp data inspect` checks them).
SAMPLE_FIELDS = {
    "id": str,
    "idx": int,
    "source": str,
    "start": (int, float),
    "duration": (int, float),
    "fps": (int, float),
    "num_frames": int,
    "width": int,
    "height": int,
    "has_audio": bool,
    "sample_rate": (int, type(None)),
    "captions": list,
    "label": (str, type(None)),
    "split": (str, type(None)),
}

VIDEO_MEMBER = "mp4"
AUDIO_MEMBERS = ("flac", "wav")
JSON_MEMBER = "json"
MEMBERS = (VIDEO_MEMBER, *AUDIO_MEMBERS, JSON_MEMBER)  # the only extensions any reader decodes


def shard_name(index: int) -> str:
    """`000042.tar` for shard 42."""
    return f"{index:06d}.tar"


def stats_name(index: int) -> str:
    """`000042.json`, the statistics file of shard 42 in `stats/`."""
    return f"{index:06d}.json"


def sample_key(idx: int) -> str:
    """The WebDataset key of sample `idx`: zero-padded, dot-free, sorts like the integer."""
    return f"{idx:09d}"


def split_member(name: str) -> tuple[str, str] | None:
    """`(key, extension)` of a tar member name (key = the path up to the first dot of the base name, extension
    lower-cased), or None when the extension is not one of `MEMBERS`: such members are never read."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return None
    ext = name[dot + 1 :].lower()
    return (name[:dot], ext) if ext in MEMBERS else None


def dataset_json(shards: list[dict], *, video: dict, audio: dict, prep: dict) -> dict:
    """The `dataset.json` mapping of a finished build: `shards` (`{"name", "samples", "seconds"}` each, in order),
    their total samples and seconds, the `video` and `audio` settings, the resolved `prep` options, and the time
    (UTC) it was made."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "seconds": round(sum(s["seconds"] for s in shards), 6),
        "video": video,
        "audio": audio,
        "prep": prep,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def read_dataset_json(dataset_dir: str | os.PathLike) -> dict:
    """`<dataset_dir>/dataset.json`, checked to be a `vatp-shards` version 1 description; ValueError otherwise."""
    path = Path(dataset_dir) / DATASET_JSON
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


def shard_paths(dataset_dir: str | os.PathLike, meta: dict | None = None) -> list[Path]:
    """The dataset's shard files in `dataset.json` order (its list, not whatever `*.tar` lies in the folder)."""
    meta = read_dataset_json(dataset_dir) if meta is None else meta
    return [Path(dataset_dir) / SHARDS_DIR / str(s["name"]) for s in meta["shards"]]


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
        size = _pax_size(pax["size"]) if "size" in pax else _tar_number(header[124:136])
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


def _pax_size(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"bad pax size record {value[:40]!r}") from None


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= space - pos:
            raise ValueError(f"bad pax record length {length}")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return records


READ_CHUNK = 64 << 20  # a member is read in pieces of this much, so a header that lies about its size is not trusted


def _read_exact(stream: BinaryIO, size: int, name: str) -> bytes:
    """`size` bytes of a member. A size larger than what is left of a file is refused before anything is read;
    a stream of unknown length is read in pieces, so a lying header costs at most what the stream holds."""
    if size < 0:
        raise ValueError(f"tar member {name!r} has a negative size {size}")
    if stream.seekable():
        here = stream.tell()
        left = stream.seek(0, io.SEEK_END) - here
        stream.seek(here)
        if size > left:
            raise ValueError(f"truncated tar member {name!r}: its header says {size} bytes, {left} are left")
        return stream.read(size)
    pieces, got = [], 0
    while got < size:
        piece = stream.read(min(size - got, READ_CHUNK))
        if not piece:
            raise ValueError(f"truncated tar member {name!r}: {got} of {size} bytes")
        pieces.append(piece)
        got += len(piece)
    return b"".join(pieces)


def _skip(stream: BinaryIO, size: int) -> None:
    if size <= 0:
        return
    if stream.seekable():
        here = stream.tell()
        end = stream.seek(0, io.SEEK_END)
        if here + size > end:
            raise ValueError(f"truncated tar stream: a member needs {size} bytes, {end - here} are left")
        stream.seek(here + size)
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


def iter_samples(stream: BinaryIO) -> Iterator[tuple[str, dict[str, bytes]]]:
    """`(key, {extension: bytes})` of each sample of a tar stream, reading only `MEMBERS` (consecutive members
    sharing a key form one sample, as WebDataset groups them)."""
    key, files = None, {}
    for name, data in iter_tar_members(stream, lambda name: split_member(name) is not None):
        k, ext = split_member(name)
        if key is not None and k != key:
            yield key, files
            files = {}
        key = k
        files[ext] = data
    if key is not None:
        yield key, files


def tokenizer_path(datasets: list[str], explicit: str | os.PathLike | None = None) -> Path:
    """The tokenizer a run uses: `explicit` when given, else `<first dataset>/tokenizer.model`.

    Raises ValueError when neither names a directory's tokenizer (a shard spec has no folder to look in).
    """
    if explicit:
        return Path(explicit).expanduser()
    if not datasets:
        raise ValueError("no tokenizer given and no dataset to find one in")
    first = Path(os.path.expanduser(str(datasets[0])))
    if not first.is_dir():
        raise ValueError(f"no tokenizer given and the first dataset {str(first)!r} is not a directory: name one")
    return first / TOKENIZER_NAME


def load_tokenizer(path: str | os.PathLike):
    """Load a `tokenizer.model` (or the one inside a dataset directory); it must use pad id `PAD_ID`."""
    import sentencepiece as spm

    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_NAME
    if not path.is_file():
        raise ValueError(f"tokenizer not found: {path} (train one with `vatp data tokenizer <dataset>`)")
    tok = spm.SentencePieceProcessor(model_file=str(path))
    if tok.pad_id() != PAD_ID:
        raise ValueError(f"{path}: pad id is {tok.pad_id()}, expected {PAD_ID} (train it with `vatp data tokenizer`)")
    return tok


def encode_batch(tok, texts: list[str], max_tokens: int):
    """Token ids int64 `(N, max_tokens)`, right-padded with `PAD_ID` and truncated, and the bool mask of real
    tokens (torch tensors)."""
    import torch

    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    ids = torch.full((len(texts), max_tokens), PAD_ID, dtype=torch.int64)  # (N, L)
    # One thread: the loader already runs one worker per core, and the thread pool costs more than it saves.
    for row, pieces in enumerate(tok.encode(list(texts), num_threads=1) if texts else []):
        pieces = pieces[:max_tokens]
        ids[row, : len(pieces)] = torch.tensor(pieces, dtype=torch.int64)
    return ids, ids != PAD_ID

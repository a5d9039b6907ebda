"""The files of an embedding directory: read a complete one, write a rank's parts, merge the parts.

Layout (rows ordered by sample idx):

    meta.jsonl               one line per video row: row, idx, id, label, captions, has_audio, windows
    <modality>@<space>.npy   float16 (N, D), L2-normalised mean of the windows' normalised embeddings (the plain
                             mean of the windows for a dot-product space, embed.json's `dot_product_spaces`)
    video@<space>.windows.npy  float16 (N, W, D) per-window embeddings (for time windows in search)
    text@<space>.npy         float16 (C, D), one row per caption, videos in row order, captions in meta order
    caption_video.npy        int64 (C,), the video row of each caption row
    video_logits.npy, audio_logits.npy   float16 (H, N, K) self-label head logits (the heads read window 0)
    video_feat.npy, audio_feat.npy       float16 (N, F) backbone features (before any space or head), averaged over
                                         the windows: what k-means, kNN and probes use on a model without spaces
    video_feat.windows.npy   float16 (N, W, F) each window's backbone features (only when asked: benchmarks)
    embed.json               written last: what was embedded, and that the directory is complete
    embed.started.json       while it is being written: what is writing it (checkpoint fingerprint, protocol)

Parts (`parts/rank<r>-<seq>.npz`) hold float16 arrays, `idx` (n,), `text_count` (n,) and a JSON `meta` list. The
merge reads one part at a time and writes into memory-mapped outputs, so its peak memory is about one part
plus the metadata, not the whole corpus (a 1M-video x 4-window x 512-d run is ~4 GB of float16 windows alone).

What made a directory (`made_with`: the checkpoint's content fingerprint and the protocol settings that change the
numbers) is recorded before the first part and kept in embed.json: `claim` refuses to add to, or reuse, a
directory another checkpoint or protocol made, and `check_checkpoint` refuses to compare one with another model.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.files import atomic_path, atomic_write

log = logging.getLogger(__name__)

COMPLETE = "embed.json"
PENDING = "embed.pending.json"  # merged, but the embedding command's last steps have not finished
STARTED = "embed.started.json"  # what is writing the directory, recorded before its first part
_INDEX_KEYS = ("idx", "meta", "text_count")  # part members that are bookkeeping, not embeddings


@dataclass
class Embeddings:
    """An embedding directory in memory (arrays are memory-mapped, float16 on disk)."""

    root: Path
    meta: list[dict]
    arrays: dict[str, np.ndarray]
    caption_video: np.ndarray
    info: dict = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        """Array `name` (e.g. "video@vt") as float32; ValueError listing what exists when absent."""
        if name not in self.arrays:
            raise ValueError(f"{self.root}: no {name}.npy (have: {', '.join(sorted(self.arrays)) or 'none'})")
        return np.asarray(self.arrays[name], dtype=np.float32)

    @property
    def idx(self) -> np.ndarray:
        return np.array([m["idx"] for m in self.meta], dtype=np.int64)

    @property
    def has_audio(self) -> np.ndarray:
        return np.array([bool(m.get("has_audio", True)) for m in self.meta])

    def labels(self, names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
        """Integer class per row (-1 where unknown) and the class names (sorted, or `names` to share codes)."""
        raw = [m.get("label") for m in self.meta]
        names = names if names is not None else sorted({str(x) for x in raw if x is not None and x != -1})
        code = {n: i for i, n in enumerate(names)}
        return np.array([code.get(str(x), -1) if x is not None else -1 for x in raw], dtype=np.int64), names


def _check_caption_video(path: Path, rows: np.ndarray, videos: int) -> None:
    """Every caption must point at an existing video row: one line naming the file, the row and the value."""
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(f"{path}: expected a 1-d integer array, got {rows.dtype} of shape {rows.shape}")
    bad = np.flatnonzero((rows < 0) | (rows >= videos))
    if len(bad):
        raise ValueError(
            f"{path}: row {bad[0]} names video {rows[bad[0]]}, outside 0..{videos - 1} "
            f"({len(bad)} such row(s)); the embedding directory is damaged: re-run `vatp embed`"
        )


def read_embeddings(root: str | Path) -> Embeddings:
    """Open an embedding directory written by `eval.embed.extract_embeddings`."""
    root = Path(root)
    if not (root / COMPLETE).is_file():
        raise ValueError(f"{root} is not a complete embedding directory (no {COMPLETE}); run `vatp embed` first")
    with open(root / "meta.jsonl", encoding="utf-8") as f:
        meta = [json.loads(line) for line in f if line.strip()]
    arrays = {p.name[:-4]: np.load(p, mmap_mode="r", allow_pickle=False) for p in sorted(root.glob("*.npy"))}
    caption_video = np.asarray(arrays.pop("caption_video", np.zeros(0, dtype=np.int64)))
    _check_caption_video(root / "caption_video.npy", caption_video, len(meta))
    for name, a in arrays.items():
        rows = a.shape[1] if name.endswith("_logits") else a.shape[0]
        expect = len(caption_video) if name.startswith("text@") else len(meta)
        if rows != expect:
            raise ValueError(f"{root}/{name}.npy has {rows} rows, expected {expect}")
    info = json.loads((root / COMPLETE).read_text(encoding="utf-8"))
    expected = info.get("expected")
    if expected is not None and len(meta) < expected:
        log.warning(
            "%s covers %d of the %d samples of %s (skipped by the loader: %s): metrics describe those %d only",
            root,
            len(meta),
            expected,
            info.get("dataset", "its dataset"),
            info.get("skipped") or "?",
            len(meta),
        )
    return Embeddings(root, meta, arrays, caption_video, info)


def write_part(stem: Path, rows: list[dict]) -> None:
    """Write batches of embedded rows as one part `stem.npz` (float arrays as float16), atomically."""
    arrays: dict[str, np.ndarray] = {}
    for name in rows[0]:
        if name == "meta":
            continue
        axis = 1 if name.endswith("_logits") else 0
        a = np.concatenate([r[name] for r in rows], axis=axis)
        arrays[name] = a.astype(np.float16) if a.dtype.kind == "f" else a
    arrays["meta"] = np.array(json.dumps([m for r in rows for m in r["meta"]]))
    with atomic_write(stem.with_suffix(".npz"), "wb") as f:  # a hidden name, outside rank*-*.npz until complete
        np.savez(f, **arrays)


def done_idx(parts: Path) -> np.ndarray:
    """Sorted unique sample idx already in `parts/` (for `np.searchsorted` membership tests)."""
    found = []
    for p in sorted(parts.glob("rank*-*.npz")):
        with np.load(p, allow_pickle=False) as z:
            found.append(z["idx"].astype(np.int64))
    return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)


def is_done(idx: np.ndarray, done: np.ndarray) -> np.ndarray:
    """Boolean mask of the entries of `idx` present in the sorted array `done`: O(len(idx) log len(done))."""
    idx = np.asarray(idx, dtype=np.int64)
    if done.size == 0:
        return np.zeros(idx.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(done, idx), done.size - 1)
    return done[pos] == idx


def merge_parts(
    out: str | Path, *, expected: int | None = None, info: dict | None = None, complete: bool = True
) -> dict:
    """Merge `out/parts/*.npz` into the final files (rows sorted by idx, duplicates dropped), part by part.

    With `complete`, `embed.json` marks the directory complete; without, the summary waits in `embed.pending.json`
    until the caller's own last steps are done and it calls `mark_complete`.
    """
    out = Path(out)
    files = sorted((out / "parts").glob("rank*-*.npz"))
    if not files:
        raise ValueError(f"{out}/parts has no embedding parts: the loader yielded no samples")
    # Pass 1: the small bookkeeping members of every part -> where each part row goes.
    idx, counts, shapes = [], [], {}
    for p in files:
        with np.load(p, allow_pickle=False) as z:
            idx.append(z["idx"].astype(np.int64))
            counts.append(z["text_count"].astype(np.int64) if "text_count" in z.files else None)
            for name in z.files:
                if name not in _INDEX_KEYS and name not in shapes:
                    shapes[name] = z[name].shape
    sizes = [len(i) for i in idx]
    all_idx = np.concatenate(idx)
    order = np.argsort(all_idx, kind="stable")
    uniq = np.concatenate([[True], np.diff(all_idx[order]) != 0])
    dupes = int((~uniq).sum())
    order = order[uniq]  # global part row of each output row
    if dupes:
        log.warning("%d samples were embedded twice (overlapping ranks or resumed runs); kept the first", dupes)
    dest = np.full(len(all_idx), -1, dtype=np.int64)  # output row of each global part row (-1: dropped duplicate)
    dest[order] = np.arange(len(order))
    n = len(order)
    names = sorted(shapes)
    text_names = [m for m in names if m.startswith("text@")]
    cap_counts = np.concatenate(counts) if text_names else np.zeros(len(all_idx), dtype=np.int64)
    cap_start = np.concatenate([[0], np.cumsum(cap_counts[order])])  # (N+1,) output caption offsets
    outputs = {}
    with contextlib.ExitStack() as moves:  # each output is <name>.npy only once every part is in it
        for name in names:
            shape = list(shapes[name])
            shape[1 if name.endswith("_logits") else 0] = int(cap_start[-1]) if name in text_names else n
            tmp = moves.enter_context(atomic_path(out / f"{name}.npy"))  # not *.npy: read_embeddings skips it
            outputs[name] = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=tuple(shape))
        # Pass 2: each part's arrays straight into their output rows; its metadata, sorted by output row, to a
        # run file (only one part's metadata is in memory at a time; the runs are merged below).
        first = 0
        runs = []
        for k, (p, size) in enumerate(zip(files, sizes)):
            rows = dest[first : first + size]  # (n_part,)
            keep = rows >= 0
            with np.load(p, allow_pickle=False) as z:
                part_meta = json.loads(str(z["meta"]))
                runs.append(out / "parts" / f"meta-{k:06d}.run")
                with open(runs[-1], "w", encoding="utf-8") as f:
                    for row, i in sorted(zip(rows[keep].tolist(), np.flatnonzero(keep).tolist())):
                        f.write(f"{row}\t{json.dumps({'row': row, **part_meta[i]})}\n")
                del part_meta
                for name in names:
                    if name not in z.files:
                        raise ValueError(
                            f"{p} has no {name!r} although other parts do (mixed models in one directory?)"
                        )
                    a = z[name]
                    if name in text_names:
                        local = cap_counts[first : first + size]
                        owner = np.repeat(np.arange(size), local)  # (c_part,) the part row of each caption
                        rank_in_video = np.arange(len(owner)) - np.repeat(np.cumsum(local) - local, local)
                        ok = keep[owner]
                        outputs[name][cap_start[rows[owner[ok]]] + rank_in_video[ok]] = a[ok]
                    elif name.endswith("_logits"):
                        outputs[name][:, rows[keep]] = a[:, keep]
                    else:
                        outputs[name][rows[keep]] = a[keep]
            first += size
        for mm in outputs.values():
            mm.flush()
        outputs.clear()  # drop the maps before the files move into place (when the block ends)
    if text_names:
        np.save(out / "caption_video.npy", np.repeat(np.arange(n), cap_counts[order]).astype(np.int64))
    _merge_meta_runs(runs, out / "meta.jsonl")
    if expected is not None and n != expected:
        log.warning("embedded %d samples but the dataset lists %d", n, expected)
    summary = {"rows": int(n), "duplicates": dupes, "arrays": names, "expected": expected}
    (out / PENDING).write_text(json.dumps({**(info or {}), **summary}, indent=1), encoding="utf-8")
    shutil.rmtree(out / "parts")
    if complete:
        mark_complete(out)
    return summary


def mark_complete(out: str | Path, **extra) -> None:
    """Turn `embed.pending.json` (plus `extra` fields) into `embed.json`: the directory is complete."""
    out = Path(out)
    info = {**json.loads((out / PENDING).read_text(encoding="utf-8")), **extra}
    (out / PENDING).write_text(json.dumps(info, indent=1), encoding="utf-8")
    os.replace(out / PENDING, out / COMPLETE)
    (out / STARTED).unlink(missing_ok=True)  # embed.json holds the same record now


def _merge_meta_runs(runs: list[Path], path: Path, fan_in: int = 128) -> None:
    """Merge per-part metadata files of `row<TAB>json` lines, each sorted by row, into `path` (JSON lines in row
    order), streaming: memory holds one line per open run. More than `fan_in` runs merge in rounds, so the
    number of open files stays bounded however many parts there are."""
    level = 0
    while len(runs) > fan_in:
        merged = []
        for g in range(0, len(runs), fan_in):
            merged.append(runs[g].with_name(f"merge{level}-{g // fan_in:06d}.run"))
            _merge_runs(runs[g : g + fan_in], merged[-1], keep_keys=True)
        runs, level = merged, level + 1
    with atomic_path(path) as tmp:
        _merge_runs(runs, tmp, keep_keys=False)


def _merge_runs(runs: list[Path], target: Path, *, keep_keys: bool) -> None:
    files = [open(r, encoding="utf-8") for r in runs]
    try:
        keyed = [((int(line.split("\t", 1)[0]), line) for line in f) for f in files]
        with open(target, "w", encoding="utf-8") as out:
            for _, line in heapq.merge(*keyed, key=lambda item: item[0]):
                out.write(line if keep_keys else line.split("\t", 1)[1])
    finally:
        for f in files:
            f.close()


def save_array(path: Path, a: np.ndarray) -> None:
    """Write `a` as float16 `.npy` atomically (a crash never leaves a readable half-array)."""
    with atomic_write(path, "wb") as f:
        np.save(f, a.astype(np.float16))


# ---- what made a directory ----------------------------------------------------------------------------------------

_DIGESTS: dict[tuple, str] = {}  # (path, inode, size, mtime) -> sha256: each file is hashed once per process


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks; cached per path, inode, size and mtime."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def checkpoint_fingerprint(checkpoint: str | Path) -> str:
    """A short content hash of a checkpoint: the `.pth` / `.pt` file, or an export's `model.yaml` and weights
    (`*.safetensors`). A checkpoint re-exported to the same path gets a new fingerprint; a copy keeps it."""
    path = Path(checkpoint)
    if path.suffix in (".pth", ".pt") and path.is_file():
        files = [path]
    else:
        root = path if path.is_dir() else path.parent
        files = sorted([root / "model.yaml", *root.glob("*.safetensors")])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{file_digest(f)}\n".encode())
    return h.hexdigest()[:16]


def made_with(out: str | Path) -> dict | None:
    """What `out` records as having made it (embed.json, else embed.pending.json, else embed.started.json)."""
    for name in (COMPLETE, PENDING, STARTED):
        if (Path(out) / name).is_file():
            return json.loads((Path(out) / name).read_text(encoding="utf-8"))
    return None


def claim(out: str | Path, made: dict) -> None:
    """Before writing into `out`: refuse, in one line, a directory that holds work (parts, a merge, a complete
    embedding) made with another checkpoint or protocol; record `made` (`checkpoint`, `fingerprint`, `protocol`)
    in a directory without work. A directory written before fingerprints were recorded is a warning."""
    out = Path(out)
    worked = (out / COMPLETE).is_file() or (out / PENDING).is_file() or any((out / "parts").glob("rank*-*.npz"))
    if not worked:
        out.mkdir(parents=True, exist_ok=True)
        (out / STARTED).write_text(json.dumps(made, indent=1), encoding="utf-8")
        return
    old = made_with(out) or {}
    if old.get("fingerprint") is None or made.get("fingerprint") is None:
        log.warning(
            "%s: cannot check that %s made it (no checkpoint fingerprint to compare: a directory written before "
            "vatp recorded them, or a model not loaded by load_model); delete it if another checkpoint did",
            out,
            made.get("checkpoint"),
        )
        return
    if old["fingerprint"] != made["fingerprint"]:
        raise ValueError(
            f"{out} was made with checkpoint {old.get('checkpoint')} (fingerprint {old['fingerprint']}), not "
            f"{made.get('checkpoint')} (fingerprint {made['fingerprint']}): choose another --out or delete it"
        )
    before, now = old.get("protocol") or {}, made.get("protocol") or {}
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        was = ", ".join(f"{k}={json.dumps(before.get(k))}" for k in changed)
        asked = ", ".join(f"{k}={json.dumps(now.get(k))}" for k in changed)
        raise ValueError(f"{out} was made with {was}, not {asked}: choose another --out or delete it")


def check_checkpoint(emb: Embeddings, checkpoint: str, fingerprint: str | None) -> None:
    """Before comparing `emb` with a model loaded from `checkpoint`: refuse (one line) when the embedding records
    another checkpoint's fingerprint; warn when it records none (embedded before vatp recorded fingerprints)."""
    made = emb.info.get("fingerprint")
    if made is None or fingerprint is None:
        log.warning(
            "%s does not record the checkpoint that made it: its embeddings are taken to come from %s",
            emb.root,
            checkpoint,
        )
    elif made != fingerprint:
        raise ValueError(
            f"{emb.root} was embedded with checkpoint {emb.info.get('checkpoint')} (fingerprint {made}), not "
            f"{checkpoint} (fingerprint {fingerprint}): pass the checkpoint that made it, or embed again with this one"
        )

"""Extract embeddings from a dataset with a model (over all ranks, resumable); the files are in eval/embed_files.py.

Each rank writes `parts/rank<r>-<seq>.npz` files every few batches (atomically); a restarted run skips the
samples whose idx is already in a part, and rank 0 merges the parts once every rank is done. Rank 0 locks the
directory for the run and refuses one that another checkpoint or protocol made (`embed_files.claim`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from eval import embed_files
from eval.embed_files import COMPLETE, Embeddings, merge_parts, read_embeddings
from pipeline.dataset import (
    DATASET_JSON,
    PAD_ID,
    SHARDS_DIR,
    TOKENIZER_NAME,
    encode_batch,
    iter_json_members,
    load_tokenizer,
    tokenizer_path,
)
from pipeline.distributed import any_rank, barrier, sum_counts
from pipeline.files import write_text_atomic

log = logging.getLogger(__name__)

# The file side is re-exported: callers read and merge embedding directories through this module.
__all__ = [
    "COMPLETE",
    "Embeddings",
    "LoadedModel",
    "embed_dataset",
    "extract_embeddings",
    "load_model",
    "merge_parts",
    "read_embeddings",
    "spaces_holding",
]


def average_windows(x: torch.Tensor) -> torch.Tensor:
    """(B, W, D) window embeddings -> (B, D): mean of the L2-normalised windows, normalised again."""
    return F.normalize(F.normalize(x.float(), dim=-1).mean(dim=1), dim=-1)


@dataclass
class LoadedModel:
    """A model ready to embed: the module, its input contracts, and how its text is tokenised."""

    module: torch.nn.Module
    contracts: dict
    tokenize: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None
    source: str  # "exported" or "s3d_howto100m"
    path: str = ""
    tokenizer: str | None = None  # the sentencepiece model `tokenize` uses (exported models)
    fingerprint: str | None = None  # content hash of the checkpoint (embed_files.checkpoint_fingerprint)
    tokenization: dict = field(default_factory=dict)  # what else shapes text embeddings: tokenizer content, words


def load_model(
    checkpoint: str | Path,
    *,
    tokenizer: str | Path | None = None,
    dict_path: str | Path | None = None,
    max_words: int = 16,
    lowercase: bool = True,
) -> LoadedModel:
    """An exported vatp model (dir with model.yaml) or the released `s3d_howto100m.pth` (with `dict_path`).

    Our models tokenise text with the dataset's sentencepiece `tokenizer`; the released S3D uses its word list
    (`max_words` words per sentence, 16 as released, 30 in MIL-NCE's evaluators; `lowercase` as released).
    """
    from models.s3d import load_s3d_howto100m
    from models.towers import load_exported

    checkpoint = Path(checkpoint)
    if checkpoint.suffix in (".pth", ".pt"):
        model = load_s3d_howto100m(checkpoint, dict_path, max_words=max_words, lowercase=lowercase)
        tok = _word_list_tokenizer(model) if model.text is not None else None
        words = {"word_list": None}
        if tok is not None:  # the word list and how sentences are cut into its words
            words = {"word_list": embed_files.file_digest(dict_path)[:16], "max_words": max_words}
            words["lowercase"] = lowercase
        fingerprint = embed_files.checkpoint_fingerprint(checkpoint)
        contracts = model.input_contracts()
        return LoadedModel(model, contracts, tok, "s3d_howto100m", str(checkpoint), None, fingerprint, words)
    if not checkpoint.exists():
        raise ValueError(f"checkpoint not found: {checkpoint}")
    model, cfg = load_exported(checkpoint)
    contracts = model.input_contracts()
    tok = None
    if "text" in contracts and tokenizer is not None:
        sp, max_tokens = load_tokenizer(tokenizer), contracts["text"].max_tokens
        tok = functools.partial(encode_batch, sp, max_tokens=max_tokens)
    used = None if tok is None else str(tokenizer)
    words = {"tokenizer": None if used is None else embed_files.file_digest(used)[:16]}
    fingerprint = embed_files.checkpoint_fingerprint(checkpoint)
    return LoadedModel(model, contracts, tok, "exported", str(checkpoint), used, fingerprint, words)


def spaces_holding(model: LoadedModel, *modalities: str) -> list[str]:
    """The shared spaces in which `model` embeds every one of `modalities` (e.g. "video", "text"), in its order."""
    if model.source == "s3d_howto100m":  # one space, vt; text only with the word list
        towers = {"video"} | ({"text"} if model.tokenize is not None else set())
        return ["vt"] if set(modalities) <= towers else []
    towers = set(model.contracts)
    return [s.name for s in getattr(model.module, "spaces", ()) if set(modalities) <= set(s.modalities) & towers]


def find_tokenizer(explicit: str | None, checkpoint: str, dataset: str | None) -> Path | None:
    """The sentencepiece model to embed text with: `explicit` when given; else the export directory's own copy
    (`vatp export` puts the training tokenizer there); else the dataset's; else None (the released S3D, or a
    model without a text tower, needs none)."""
    if explicit:
        return Path(explicit)
    exported = Path(checkpoint) / TOKENIZER_NAME
    if exported.is_file():
        return exported
    if dataset:
        try:
            path = tokenizer_path([dataset])
        except ValueError:  # not a directory (e.g. the dataset has moved): nothing to look in
            return None
        if path.is_file():
            return path
    return None


def _word_list_tokenizer(model) -> Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]:
    def tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = model.tokenize(texts)  # (N, L); padding is PAD_ID
        return ids, ids != PAD_ID

    return tokenize


def embed_texts(
    model: LoadedModel, texts: list[str], space: str = "vt", batch_size: int = 256, normalize: bool = True
) -> np.ndarray:
    """`text@<space>` embeddings (N, D) of `texts`, L2-normalised unless `normalize` is false."""
    if model.tokenize is None:
        raise ValueError("this model has no text tower or no tokenizer was given (--tokenizer)")
    out = []
    device = next(model.module.parameters()).device
    for s in range(0, len(texts), batch_size):
        ids, mask = model.tokenize(texts[s : s + batch_size])
        text = {"text": ids[:, None].to(device), "text_mask": mask[:, None].to(device)}  # (B, 1, L)
        with torch.inference_mode():
            z = model.module(text)[f"text@{space}"]  # (B, 1, D)
        z = z[:, 0].float()
        out.append((F.normalize(z, dim=-1) if normalize else z).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def embed_dataset(
    model: LoadedModel,
    dataset: str | Path,
    out: str | Path,
    *,
    windows: int = 4,
    batch_size: int = 8,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    device: str = "cpu",
    data_overrides: dict | None = None,
    feature_windows: bool = False,
) -> dict:
    """Embed every sample of `dataset` with `model` into `out` (see the module docstring); call on every rank.

    Rank 0 holds `<out>/.lock` throughout (a second process embedding into `out` is refused) and refuses a
    directory that another checkpoint or protocol made (`embed_files.claim`); `num_workers` is capped at the
    shards each rank reads. `feature_windows` also keeps each window's backbone features (`video_feat.windows`,
    N x W x F: large), for protocols that classify windows (MIL-NCE's HMDB linear SVM)."""
    from pipeline.data import make_eval_loader
    from pipeline.dataset import read_dataset_json

    out = Path(out)
    if not Path(dataset, DATASET_JSON).is_file() and not Path(dataset, SHARDS_DIR).is_dir():
        raise ValueError(f"dataset not found: {dataset} has no dataset.json and no shards/ (build it with `vatp data`)")
    if Path(dataset, DATASET_JSON).is_file() and not read_dataset_json(dataset)["shards"]:
        raise ValueError(f"{dataset} holds no samples (no input could be built: see its failures.jsonl)")
    protocol = {"windows": windows, "clip": dict(sorted((data_overrides or {}).items())), **model.tokenization}
    made = json.loads(json.dumps({"checkpoint": model.path, "fingerprint": model.fingerprint, "protocol": protocol}))
    with contextlib.ExitStack() as held:
        _hold(out, made, rank=rank, device=device, stack=held)
        if (out / COMPLETE).is_file():
            log.info("%s is already complete, made with this checkpoint and protocol", out)
            return {"rows": len(read_embeddings(out).meta), "embedded": 0, "resumed": 0, "seconds": 0.0}
        merged = (out / embed_files.PENDING).is_file()  # an earlier run merged, then stopped in the last steps
        c = model.contracts
        cfg, sizes = _loader_config(model, dataset, windows, batch_size, num_workers, world_size, data_overrides)
        loader = make_eval_loader(cfg, rank=rank, world_size=world_size)
        expected = None if None in sizes else sum(sizes)
        info = {"checkpoint": model.path, "kind": model.source, "dataset": str(dataset), "windows": windows}
        info.update(fingerprint=made["fingerprint"], protocol=made["protocol"], world_size=world_size)
        info["dot_product_spaces"] = sorted(getattr(model.module, "dot_product_spaces", ()))
        summary = {"embedded": 0, "resumed": 0, "seconds": 0.0}
        if not merged:
            summary = extract_embeddings(
                model.module.to(device),
                loader,
                out,
                rank=rank,
                world_size=world_size,
                device=device,
                expected=expected,
                info=info,
                total=len(loader),
                complete=False,
                feature_windows=feature_windows,
            )
        if loader.skipped:
            log.warning("rank %d: loader skipped samples: %s", rank, loader.skipped)
        summary["skipped"] = sum_counts(loader.skipped)  # over all ranks
        if rank == 0:  # the last steps, then the marker: an interrupted run never leaves a folder marked complete
            if model.source == "s3d_howto100m" and model.tokenize is not None:
                _embed_meta_captions(model, out)
            if "video" in c:
                add_window_times(out, dataset, cfg)
            extra = {"skipped": summary["skipped"]} if not merged else {}
            embed_files.mark_complete(out, **extra)
        barrier()
    return summary


def _hold(out: Path, made: dict, *, rank: int, device: str, stack: contextlib.ExitStack) -> None:
    """Rank 0 locks `out` (until `stack` closes) and claims it for `made`; every rank raises when that fails."""
    from pipeline.files import output_lock

    error = None
    if rank == 0:
        try:
            stack.enter_context(output_lock(out))
            embed_files.claim(out, made)
        except (ValueError, OSError) as e:  # raised below, once every rank knows
            error = e
    (refused,) = any_rank(error is not None, device=device)  # the other ranks must not wait for rank 0 forever
    if error is not None:
        raise error
    if refused:
        raise ValueError(f"rank 0 refused to embed into {out} (its error says why)")


def _loader_config(model: LoadedModel, dataset, windows, batch_size, num_workers, world_size, overrides):
    """The eval loader's DataConfig for `model` (its contracts and vocabulary), and the shards' sample counts."""
    from pipeline.data import resolve_shards
    from pipeline.data_config import DataConfig, DatasetSource, data_config_for

    shards = resolve_shards([DatasetSource(str(dataset))])
    if len(shards) < world_size:
        raise ValueError(f"{dataset} has {len(shards)} shard(s), fewer than the {world_size} ranks: use at most that")
    if num_workers > len(shards) // world_size:  # the exact-epoch loader gives each worker whole shards
        fit = len(shards) // world_size
        log.info(
            "%s: %d shard(s), so %d loader worker(s) per rank instead of %d", dataset, len(shards), fit, num_workers
        )
        num_workers = fit
    c = model.contracts
    pairs_text_in_loader = "text" in c and model.source == "exported" and model.tokenizer is not None
    if "text" in c and model.source == "exported" and model.tokenizer is None:
        log.warning("the model has a text tower but no tokenizer was given: captions are not embedded")
    cfg = DataConfig(
        datasets=[DatasetSource(str(dataset))],
        views="eval",
        mode="exact",
        batch_size=batch_size,
        num_workers=num_workers,
        eval_windows=windows,
        with_meta=True,
        **(overrides or {}),
    )
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, tokenizer=model.tokenizer))  # its vocabulary
    return data_config_for(cfg, c, captions=pairs_text_in_loader), [shard.samples for shard in shards]


def add_window_times(out: str | Path, dataset: str | Path, cfg) -> None:
    """Add `start`, `duration` and each window's [start, end] (seconds in the source video) to meta.jsonl.

    Window starts follow the loader's eval views of `cfg` (a resolved `DataConfig`: windows, placement, clip
    length). Reads only the shards' `.json` members.
    """
    from pipeline.data import resolve_shards
    from pipeline.data_config import DatasetSource
    from pipeline.views import eval_span, eval_window_starts

    out = Path(out)
    clip_seconds, windows = cfg.num_frames / cfg.fps, cfg.eval_windows
    times: dict[int, tuple[float, float, tuple[float, float]]] = {}
    for shard in resolve_shards([DatasetSource(str(dataset))]):
        try:
            for _, m in iter_json_members(shard.url):
                if "idx" not in m:
                    continue  # the loader skipped and counted it too
                frames, fps = m.get("num_frames"), m.get("fps")
                duration = frames / fps if frames and fps else float(m.get("duration") or 0.0)
                span = eval_span(m, duration, cfg.eval_placement)
                times[int(m["idx"])] = (float(m.get("start") or 0.0), duration, span)
        except ValueError as e:  # the loader counted this shard as bad_shard; its rows have no times
            log.warning("window times: %s", e)
    path = out / "meta.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for r in rows:
        if r["idx"] not in times:
            continue
        start, duration, span = times[r["idx"]]
        starts = eval_window_starts(
            duration, clip_seconds, windows, placement=cfg.eval_placement, end_gap=cfg.eval_end_gap, span=span
        )
        length = min(clip_seconds, duration) if windows else duration
        r.update(start=start, duration=duration)
        r["windows"] = [[round(start + s, 3), round(start + s + length, 3)] for s in starts]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def _embed_meta_captions(model: LoadedModel, out: Path) -> None:
    """For models whose tokeniser the loader does not know (the released S3D): embed meta.jsonl's captions."""
    with open(out / "meta.jsonl", encoding="utf-8") as f:
        meta = [json.loads(line) for line in f if line.strip()]
    texts = [c for m in meta for c in m.get("captions") or []]
    counts = [len(m.get("captions") or []) for m in meta]
    embed_files.save_array(out / "text@vt.npy", embed_texts(model, texts) if texts else np.zeros((0, 512)))
    np.save(out / "caption_video.npy", np.repeat(np.arange(len(counts)), counts).astype(np.int64))


def extract_embeddings(
    model: Callable[[dict], dict],
    batches: Iterable[dict],
    out: str | Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    flush_every: int = 20,
    expected: int | None = None,
    info: dict | None = None,
    total: int | None = None,
    complete: bool = True,
    dot_product_spaces: Iterable[str] | None = None,
    feature_windows: bool = False,
) -> dict:
    """Embed every batch with `model` into `out` (this rank's part), then merge on rank 0 (`complete=False`:
    the caller marks the directory complete itself, `embed_files.mark_complete`, after its own last steps).

    `batches` yields eval batches (pipeline.data.make_eval_loader). Call on every rank; ranks synchronise
    through torch.distributed when it is initialised. Returns a summary dict (rows, skipped, seconds).

    Spaces the model declares `normalize: false` (`dot_product_spaces`, default: the model's own attribute) are
    stored as the plain mean of the window embeddings and raw caption embeddings, so retrieval ranks them by the
    dot product, as the MIL-NCE release does; every other space is stored as unit vectors (cosine).
    """
    raw = set(getattr(model, "dot_product_spaces", ()) if dot_product_spaces is None else dot_product_spaces)
    out = Path(out)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    done = embed_files.done_idx(parts)  # sorted array, looked up with searchsorted per batch
    t0 = time.time()
    buf: list[dict] = []
    seq = len(list(parts.glob(f"rank{rank}-*.npz")))
    embedded = skipped = 0
    bar = tqdm(batches, desc=f"embed r{rank}", unit="batch", total=total, disable=rank != 0)
    for batch in bar:
        keep = ~embed_files.is_done(batch["idx"].numpy(), done)
        skipped += int((~keep).sum())
        if not keep.any():
            continue
        rows = _embed_batch(model, _select(batch, keep), device, raw, feature_windows)
        buf.append(rows)
        embedded += len(rows["idx"])
        if len(buf) >= flush_every:
            embed_files.write_part(parts / f"rank{rank}-{seq:05d}", buf)
            seq, buf = seq + 1, []
    if buf:
        embed_files.write_part(parts / f"rank{rank}-{seq:05d}", buf)
    if skipped:
        log.info("rank %d: %d samples already embedded by an earlier run, skipped", rank, skipped)
    barrier()
    summary = {"embedded": embedded, "resumed": skipped, "seconds": time.time() - t0}
    if rank == 0:
        summary.update(merge_parts(out, expected=expected, info=info, complete=complete))
    barrier()
    return summary


CAPTION_KEYS = ("captions", "captions_mask", "caption_count")  # eval batches: every caption, flat
TEXT_CHUNK = 512  # captions per text-tower call, so a sample with thousands of subtitle cues stays cheap


def _embed_batch(
    model: Callable[[dict], dict], batch: dict, device, raw: set[str] = frozenset(), feature_windows: bool = False
) -> dict:
    inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in CAPTION_KEYS}
    with torch.inference_mode():
        out = model(inputs)
        if "captions" in batch:
            out.update(_embed_captions(model, batch["captions"], batch["captions_mask"], device))
    b = len(batch["idx"])
    rows: dict = {"idx": batch["idx"].numpy().astype(np.int64), "meta": _batch_meta(batch)}
    for name, x in out.items():
        if "@" in name and name.startswith(("video@", "audio@")):
            x = x.reshape(b, -1, x.shape[-1])  # (B, W, D)
            dot = name.split("@", 1)[1] in raw
            rows[name] = (x.float().mean(1) if dot else average_windows(x)).cpu().numpy()
            if name.startswith("video@"):
                rows[name + ".windows"] = F.normalize(x.float(), dim=-1).cpu().numpy()
        elif name.startswith("text@"):  # (C, D): one row per caption, the batch's videos in order
            x = x.float() if name.split("@", 1)[1] in raw else F.normalize(x.float(), dim=-1)
            rows[name] = x.cpu().numpy()
            rows["text_count"] = batch["caption_count"].numpy().astype(np.int64)
        elif name in ("video/feat", "audio/feat"):  # backbone features: k-means, kNN and probes on any model
            x = x.float().reshape(b, -1, x.shape[-1])  # (B, W, F)
            rows[name.replace("/", "_")] = x.mean(1).cpu().numpy()
            if feature_windows and name == "video/feat":
                rows["video_feat.windows"] = x.cpu().numpy()
        elif name.endswith("/logits"):
            h = x.shape[0]
            x = x.float().reshape(h, b, -1, x.shape[-1]).mean(2)  # (H, B, K), windows averaged
            rows[name.split("/")[0] + "_logits"] = x.cpu().numpy()
    return rows


def _embed_captions(model: Callable[[dict], dict], ids: torch.Tensor, mask: torch.Tensor, device) -> dict:
    """`text@<space>` `(C, D)` of the flat caption rows `ids (C, L)`, through the text tower `TEXT_CHUNK` at a
    time. A batch without captions still gives `(0, D)` arrays, so every part holds the same arrays."""
    if len(ids) == 0:
        zero = torch.zeros(1, *ids.shape[1:], dtype=ids.dtype)  # one all-padding caption, to learn D
        return {k: v[:0] for k, v in _embed_captions(model, zero, zero.bool(), device).items()}
    chunks: dict[str, list[torch.Tensor]] = {}
    for s in range(0, len(ids), TEXT_CHUNK):
        text = {
            "text": ids[s : s + TEXT_CHUNK, None].to(device),
            "text_mask": mask[s : s + TEXT_CHUNK, None].to(device),
        }
        for name, z in model(text).items():
            if name.startswith("text@"):
                chunks.setdefault(name, []).append(z[:, 0])  # (c, 1, D) -> (c, D)
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def _batch_meta(batch: dict) -> list[dict]:
    metas = batch.get("meta")
    b = len(batch["idx"])
    metas = list(metas) if metas is not None else [{} for _ in range(b)]
    has_audio = batch.get("has_audio")
    out = []
    for i, m in enumerate(metas):
        m = dict(m)
        m["idx"] = int(batch["idx"][i])
        if has_audio is not None:
            m["has_audio"] = bool(has_audio[i])
        out.append(m)
    return out


def _select(batch: dict, keep: np.ndarray) -> dict:
    """The rows of `batch` where `keep` (B,) is true; flat captions follow the rows that own them."""
    sel = torch.from_numpy(np.flatnonzero(keep))
    out = {}
    if "caption_count" in batch:
        owner = np.repeat(np.arange(len(keep)), batch["caption_count"].numpy())  # (C,) row of each caption
        caption_sel = torch.from_numpy(np.flatnonzero(keep[owner]))
        out.update({k: batch[k][caption_sel] for k in ("captions", "captions_mask")})
    for k, v in batch.items():
        if k in ("captions", "captions_mask"):
            continue
        if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == len(keep):
            out[k] = v[sel]
        elif isinstance(v, list) and len(v) == len(keep):
            out[k] = [v[i] for i in sel.tolist()]
        else:
            out[k] = v
    return out

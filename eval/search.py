"""Search an embedded corpus with a text query or a query clip: top-k videos, scores, best time window."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from eval import faiss_index
from eval.embed import Embeddings, LoadedModel, average_windows, embed_texts, spaces_holding

log = logging.getLogger(__name__)


def search(emb: Embeddings, query: np.ndarray, *, space: str = "vt", k: int = 5, modality: str = "video") -> list[dict]:
    """Top-`k` rows of `<modality>@<space>` for the normalised query vector (D,), best first.

    Each hit has rank, score, row, idx, id, label, the first captions, and, when per-window embeddings were
    saved, the best-matching window (its index, score and [start, end] seconds in the source video).
    """
    name = f"{modality}@{space}"
    gallery = emb.get(name)
    query = np.asarray(query, dtype=np.float32).reshape(1, -1)
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query has dimension {query.shape[1]}, {name} has {gallery.shape[1]}")
    scores, rows = faiss_index.knn(query, gallery, min(k, len(gallery)))
    windows = emb.arrays.get(f"{name}.windows")
    hits = []
    for rank, (score, row) in enumerate(zip(scores[0], rows[0]), 1):
        m = emb.meta[int(row)]
        hit = {
            "rank": rank,
            "score": float(score),
            "row": int(row),
            "idx": m["idx"],
            "id": m.get("id"),
            "label": m.get("label"),
            "captions": (m.get("captions") or [])[:3],
        }
        if windows is not None:
            w = np.asarray(windows[int(row)], dtype=np.float32) @ query[0]  # (W,) per-window scores
            best = int(w.argmax())
            hit["window"] = {"index": best, "score": float(w[best])}
            if m.get("windows"):
                hit["window"]["seconds"] = m["windows"][best]
        hits.append(hit)
    return hits


def text_query(model: LoadedModel, text: str, space: str = "vt") -> np.ndarray:
    """The normalised `text@<space>` embedding (D,) of one query string."""
    if not text.strip():
        raise ValueError("the text query is empty")
    _check_space(model, space, "text")
    return embed_texts(model, [text], space)[0]


def video_query(model: LoadedModel, path: str | Path, *, space: str = "vt", windows: int = 4) -> np.ndarray:
    """The normalised `video@<space>` embedding (D,) of a clip file: `windows` evenly spaced clips, averaged."""
    from pipeline.video import center_clip, decode_clip, open_video

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"query video not found: {path}")
    contract = model.contracts.get("video")
    if contract is None:
        raise ValueError("this model has no video tower")
    _check_space(model, space, "video")
    try:
        video = open_video(path.read_bytes(), "pyav")
    except Exception as e:
        raise ValueError(f"{path}: cannot decode ({type(e).__name__}: {e})") from e
    duration = video.num_frames / video.fps
    starts = np.linspace(0, max(duration - contract.seconds, 0), windows)
    clips = [center_clip(decode_clip(video, s, contract.num_frames, contract.fps), contract.size) for s in starts]
    batch = {"video": torch.stack(clips)[None]}  # (1, W, C, T, H, W)
    with torch.inference_mode():
        z = model.module(batch)[f"video@{space}"]  # (1, W, D)
    return average_windows(z)[0].cpu().numpy()


def _check_space(model: LoadedModel, space: str, modality: str) -> None:
    """One line naming the spaces that would do, when `model` has no `modality` (nor video) in `space`."""
    both = spaces_holding(model, "video", modality)
    if space not in both:
        raise ValueError(
            f"--space {space}: {model.path} has no video and {modality} in {space!r} "
            f"(spaces with both: {', '.join(both) or 'none'})"
        )


def format_hits(hits: list[dict]) -> str:
    """A readable table of search hits."""
    lines = [f"{'rank':>4} {'score':>7}  {'id':<24} {'label':<14} window     caption"]
    for h in hits:
        sec = h.get("window", {}).get("seconds")
        window = f"{sec[0]:5.1f}-{sec[1]:<5.1f}" if sec else f"#{h['window']['index']}" if "window" in h else "-"
        caption = h["captions"][0] if h["captions"] else ""
        lines.append(
            f"{h['rank']:>4} {h['score']:7.3f}  {str(h['id'])[:24]:<24} {str(h['label'])[:14]:<14} "
            f"{window:<10} {caption[:60]}"
        )
    return "\n".join(lines)

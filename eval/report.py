"""A static HTML cluster explorer with hand-written SVG plots (no plotting dependency).

    <out>/index.html        summary, plots, then one <section class="cluster"> per cluster shown
    <out>/media/<idx>.gif   animated preview (or .jpg thumbnail) of each shown video, decoded from the shards
    <out>/media/<idx>.flac  the video's audio track, copied from the shard (played by an <audio> element)

Media are read from the shards `dataset.json` lists, by the format's member extensions only (`pipeline.dataset`).
"""

from __future__ import annotations

import html
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from eval.embed import Embeddings
from eval.probe import default_video_array, row_array
from pipeline.dataset import JSON_MEMBER, VIDEO_MEMBER, iter_tar_members, shard_paths, split_member

log = logging.getLogger(__name__)

PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f"]
CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots figure{background:#fff;border:1px solid #ddd;padding:.5em;margin:0}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
.cluster{background:#fff;border:1px solid #ddd;margin:1em 0;padding:.5em 1em}
.items{display:flex;flex-wrap:wrap;gap:.8em}.item{width:180px;margin:0;font-size:12px}
.item img{width:176px;border:1px solid #ccc}.item audio{width:176px;height:28px}
.label{color:#555}.wrong{color:#b00}
"""


def write_report(
    emb: Embeddings,
    assign: np.ndarray,
    out: str | Path,
    *,
    dataset: str | Path | None = None,
    space: str = "auto",
    names: dict[int, str] | None = None,
    metrics: dict | None = None,
    per_cluster: int = 8,
    max_clusters: int = 100,
    preview: str = "gif",
) -> Path:
    """Write the explorer for cluster assignments `assign` (one per embedding row); returns index.html's path."""
    out = Path(out)
    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)
    assign = np.asarray(assign, dtype=np.int64)
    if len(assign) != len(emb.meta):
        raise ValueError(f"{len(assign)} cluster assignments for {len(emb.meta)} embedding rows")
    if preview not in ("gif", "jpg"):
        raise ValueError(f"preview must be 'gif' or 'jpg', got {preview!r}")
    sizes = np.bincount(assign)
    shown = [int(c) for c in np.argsort(-sizes, kind="stable")[:max_clusters] if sizes[c] > 0]
    rows = {c: np.flatnonzero(assign == c)[:per_cluster] for c in shown}
    wanted = {int(emb.meta[r]["idx"]) for rs in rows.values() for r in rs}
    files = export_media(dataset, wanted, media, preview) if dataset is not None else {}
    space = default_video_array(emb) if space == "auto" else space
    x = row_array(emb, space)
    plots = [
        ("Cluster sizes", svg_bars(sizes[shown])),
        ("2-D projection (PCA)", svg_scatter(pca_2d(x), assign)),
    ]
    if metrics:
        curves = {k: v["curve"] for k, v in metrics.items() if isinstance(v, dict) and "curve" in v}
        if curves:
            plots.insert(0, ("Recall@K", svg_recall(curves)))
    sections = [_cluster_html(c, rows[c], np.flatnonzero(assign == c), emb, files, (names or {}).get(c)) for c in shown]
    page = [
        "<!doctype html><html><head><meta charset='utf-8'><title>vatp clusters</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>Clusters of {html.escape(str(emb.root))}</h1>",
        f"<p id='summary'>{len(assign)} videos, {int((sizes > 0).sum())} non-empty clusters, "
        f"{len(shown)} shown (largest first), space <code>{html.escape(space)}</code>.</p>",
        _metrics_table(metrics) if metrics else "",
        "<div class='plots'>",
        *[f"<figure><figcaption>{t}</figcaption>{svg}</figure>" for t, svg in plots],
        "</div>",
        *sections,
        "</body></html>",
    ]
    path = out / "index.html"
    path.write_text("\n".join(page), encoding="utf-8")
    log.info("report: %s (%d clusters, %d media files)", path, len(shown), len(files))
    return path


def _cluster_html(c: int, rows: np.ndarray, members: np.ndarray, emb: Embeddings, files: dict, name: str | None) -> str:
    known = [lab for lab in (emb.meta[r].get("label") for r in members) if lab is not None]
    majority = max(set(known), key=known.count, default=None)
    title = f"Cluster {c}" + (f" — {html.escape(str(name))}" if name else "")
    purity = ""
    if majority is not None:
        share = 100 * known.count(majority) / len(known)
        purity = f", purity {share:.0f}% ({html.escape(str(majority))}, {len(known)} labelled)"
    items = []
    for r in rows:
        m = emb.meta[r]
        idx, got = int(m["idx"]), files.get(int(m["idx"]), {})
        img = f"<img src='media/{got['image']}' alt='video {idx}'>" if "image" in got else ""
        audio = f"<audio controls preload='none' src='media/{got['audio']}'></audio>" if "audio" in got else ""
        caps = "<br>".join(html.escape(str(t)) for t in (m.get("captions") or [])[:2])
        cls = "label wrong" if majority is not None and m.get("label") != majority else "label"
        items.append(
            f"<figure class='item' data-idx='{idx}'>{img}{audio}<figcaption>"
            f"<b>{html.escape(str(m.get('id', idx)))}</b> <span class='{cls}'>{html.escape(str(m.get('label')))}"
            f"</span><br>{caps}</figcaption></figure>"
        )
    return (
        f"<section class='cluster' id='cluster-{c}' data-cluster='{c}'><h2>{title}</h2>"
        f"<p>{len(members)} videos{purity}</p><div class='items'>{''.join(items)}</div></section>"
    )


def _metrics_table(metrics: dict) -> str:
    rows = []
    for name, vals in metrics.items():
        if isinstance(vals, dict):
            cells = " ".join(
                f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in vals.items() if k != "curve"
            )
            rows.append(f"<tr><th>{html.escape(name)}</th><td>{html.escape(cells)}</td></tr>")
    return f"<table id='metrics'>{''.join(rows)}</table>"


def export_media(dataset: str | Path, wanted: set[int], media: Path, preview: str = "gif") -> dict[int, dict]:
    """Previews and audio of samples `wanted` (by idx) from the dataset's shards: {idx: {"image", "audio"}}."""
    shards = shard_paths(dataset)
    if not shards:
        raise ValueError(f"{dataset}: dataset.json lists no shards to read previews from")

    def media_member(name: str) -> bool:  # the video or audio of a wanted sample; nothing else is read
        key_ext = split_member(name)
        if key_ext is None or key_ext[1] == JSON_MEMBER:
            return False
        key = key_ext[0].rpartition("/")[2]
        return key.isdigit() and int(key) in wanted

    found: dict[int, dict] = {}
    for shard in tqdm(shards, desc="report media", unit="shard", disable=len(shards) < 4):
        with open(shard, "rb") as stream:
            for name, data in iter_tar_members(stream, media_member):
                key, ext = split_member(name)
                idx = int(key.rpartition("/")[2])
                if ext == VIDEO_MEMBER:
                    try:
                        name = f"{idx}.{preview}"
                        write_preview(data, media / name, animated=preview == "gif")
                        found.setdefault(idx, {})["image"] = name
                    except Exception as e:  # a bad video loses its preview, not the report
                        log.warning("sample %d: no preview (%s: %s)", idx, type(e).__name__, e)
                else:
                    (media / f"{idx}.{ext}").write_bytes(data)
                    found.setdefault(idx, {})["audio"] = f"{idx}.{ext}"
    missing = wanted - {i for i, f in found.items() if "image" in f}
    if missing:
        log.warning("%d shown videos have no preview (not in the shards or undecodable)", len(missing))
    return found


def write_preview(mp4: bytes, path: Path, *, animated: bool = True, frames: int = 8, width: int = 176) -> None:
    """A `width`-px JPEG of the middle frame, or an animated GIF of `frames` evenly spaced frames."""
    with av.open(io.BytesIO(mp4)) as container:
        decoded = [f.to_image() for f in container.decode(video=0)]
    if not decoded:
        raise ValueError("no video frames")
    picks = np.linspace(0, len(decoded) - 1, frames if animated else 1).round().astype(int)
    if not animated:
        picks = [len(decoded) // 2]
    images = [decoded[i] for i in picks]
    h = max(1, round(images[0].height * width / images[0].width))
    images = [im.convert("RGB").resize((width, h)) for im in images]
    if animated:
        images[0].save(path, save_all=True, append_images=images[1:], duration=250, loop=0)
    else:
        images[0].save(path, quality=85)


def pca_2d(x: np.ndarray, max_points: int = 5000, seed: int = 0) -> np.ndarray:
    """First two principal components of `x` (N, D) -> (N, 2), fitted on at most `max_points` rows."""
    x = np.asarray(x, dtype=np.float32)
    fit = x if len(x) <= max_points else x[np.random.default_rng(seed).choice(len(x), max_points, replace=False)]
    mean = fit.mean(0)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    return (x - mean) @ vt[:2].T if vt.shape[0] >= 2 else np.c_[(x - mean) @ vt[:1].T, np.zeros(len(x))]


def svg_bars(values: Sequence[float], width: int = 420, height: int = 200) -> str:
    """A bar chart (one bar per value, in order) with the max value labelled."""
    values = np.asarray(values, dtype=float)
    top = values.max() if values.size and values.max() > 0 else 1.0
    bw = (width - 40) / max(len(values), 1)
    bars = "".join(
        f"<rect x='{30 + i * bw:.1f}' y='{height - 20 - v / top * (height - 40):.1f}' width='{max(bw - 1, 0.5):.1f}' "
        f"height='{v / top * (height - 40):.1f}' fill='{PALETTE[0]}'/>"
        for i, v in enumerate(values)
    )
    return (
        f"<svg class='plot' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}'>{bars}"
        f"<text x='2' y='16' font-size='11'>{int(top)}</text>"
        f"<text x='30' y='{height - 4}' font-size='11'>clusters by size ({len(values)})</text></svg>"
    )


def svg_scatter(xy: np.ndarray, groups: np.ndarray, size: int = 320, max_points: int = 3000) -> str:
    """A scatter plot of 2-D points coloured by group (at most `max_points`, evenly subsampled)."""
    keep = np.linspace(0, len(xy) - 1, min(len(xy), max_points)).round().astype(int)
    p, g = xy[keep], np.asarray(groups)[keep]
    lo, hi = p.min(0), p.max(0)
    p = 10 + (p - lo) / np.where(hi > lo, hi - lo, 1) * (size - 20)
    dots = "".join(
        f"<circle cx='{a:.1f}' cy='{size - b:.1f}' r='3' fill='{PALETTE[int(c) % len(PALETTE)]}'/>"
        for (a, b), c in zip(p, g)
    )
    return f"<svg class='plot' xmlns='http://www.w3.org/2000/svg' width='{size}' height='{size}'>{dots}</svg>"


def svg_recall(curves: dict[str, dict], width: int = 420, height: int = 220) -> str:
    """Recall@K (percent) against K on a log axis, one line per direction: curves[name] = {"K": recall}."""
    ks = sorted({int(k) for c in curves.values() for k in c})
    lx = np.log(ks)
    span = lx[-1] - lx[0] if len(ks) > 1 else 1.0

    def xy(k, r):
        return 40 + (np.log(k) - lx[0]) / span * (width - 60), height - 25 - r / 100 * (height - 45)

    lines, legend = [], []
    for i, (name, curve) in enumerate(curves.items()):
        points = sorted((int(k), v) for k, v in curve.items())
        pts = " ".join("{:.1f},{:.1f}".format(*xy(k, v)) for k, v in points)
        colour = PALETTE[i % len(PALETTE)]
        lines.append(f"<polyline fill='none' stroke='{colour}' stroke-width='2' points='{pts}'/>")
        legend.append(f"<text x='{width - 150}' y='{16 + 14 * i}' font-size='11' fill='{colour}'>{name}</text>")
    ticks = "".join(f"<text x='{xy(k, 0)[0] - 4:.1f}' y='{height - 8}' font-size='10'>{k}</text>" for k in ks)
    return (
        f"<svg class='plot' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}'>"
        f"<text x='2' y='{height - 25 - (height - 45):.0f}' font-size='10'>100%</text>"
        f"<text x='14' y='{height - 25}' font-size='10'>0%</text>{''.join(lines)}{''.join(legend)}{ticks}</svg>"
    )


def load_json(path: str | Path | None) -> dict | None:
    """A JSON file's content, or None when `path` is None."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metrics file not found: {path}")
    return json.loads(path.read_text(encoding="utf-8"))

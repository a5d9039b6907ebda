"""The HTML cluster explorer on the tiny real dataset: media from the shards, rendered in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.report import pca_2d, svg_bars, svg_recall
from launch.cli import main

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def shard_meta(dataset: Path) -> list[dict]:
    """The json member of every sample in the dataset's shards, sorted by idx."""
    rows = []
    for shard in sorted((dataset / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    rows.append(json.loads(tar.extractfile(m).read()))
    return sorted(rows, key=lambda r: r["idx"])


def write_embedding_dir(root: Path, meta: list[dict], arrays: dict[str, np.ndarray], caption_video=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "meta.jsonl", "w") as f:
        for row, m in enumerate(meta):
            f.write(json.dumps({"row": row, **m}) + "\n")
    for name, a in arrays.items():
        np.save(root / f"{name}.npy", a.astype(np.float16))
    if caption_video is not None:
        np.save(root / "caption_video.npy", np.asarray(caption_video, dtype=np.int64))
    (root / "embed.json").write_text(json.dumps({"rows": len(meta)}))
    return root


@pytest.fixture(scope="module")
def clustered(tiny_dataset, tmp_path_factory):
    """Embeddings planted around one centre per label, clustered with `vatp eval cluster`."""
    samples = shard_meta(tiny_dataset)
    labels = sorted({s["label"] for s in samples})
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((len(labels), 16))
    x = np.stack([centres[labels.index(s["label"])] for s in samples]) + 0.05 * rng.standard_normal((len(samples), 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    meta = [
        {"idx": s["idx"], "id": s["id"], "label": s["label"], "captions": [c["text"] for c in s["captions"]]}
        for s in samples
    ]
    emb = write_embedding_dir(tmp_path_factory.mktemp("emb"), meta, {"video@vt": x})
    assert main(["eval", "cluster", str(emb), "--k", str(len(labels)), "--set", "nredo=3", "--set", "shots=[1]"]) == 0
    return emb, samples, labels


def test_cluster_command_writes_assignments_that_match_the_labels(clustered):
    emb, samples, labels = clustered
    summary = json.loads((emb / "clusters" / "clusters.json").read_text())
    assert summary["points_used"] == len(samples)
    assert summary["metrics"]["acc"] == pytest.approx(100.0)
    rows = [json.loads(line) for line in (emb / "clusters" / "assignments.jsonl").read_text().splitlines()]
    assert [r["idx"] for r in rows] == [s["idx"] for s in samples]
    assert all(r["name"] == r["label"] for r in rows)


def test_report_media_and_structure(clustered, tiny_dataset, tmp_path):
    emb, samples, labels = clustered
    out = tmp_path / "report"
    assert (
        main(["report", str(emb), "--data", str(tiny_dataset), "--clusters", str(emb / "clusters"), "--out", str(out)])
        == 0
    )
    page = (out / "index.html").read_text()
    assert page.count("<section class='cluster'") == len(labels)
    for s in samples:
        gif = Image.open(out / "media" / f"{s['idx']}.gif")
        assert gif.n_frames > 1 and gif.width == 176
        if s["has_audio"]:
            assert (out / "media" / f"{s['idx']}.flac").stat().st_size > 0
            assert f"media/{s['idx']}.flac" in page
    assert page.count("<svg class='plot'") == 2


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(clustered, tiny_dataset, tmp_path):
    emb, samples, labels = clustered
    out = tmp_path / "report"
    main(
        [
            "report",
            str(emb),
            "--data",
            str(tiny_dataset),
            "--out",
            str(out),
            "--k",
            str(len(labels)),
            "--set",
            "preview=jpg",
        ]
    )
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = (out / "index.html").as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    # count what the browser parsed, not what we wrote: the DOM serialiser rewrites quotes
    assert dom.count('class="cluster"') == len(labels)
    assert dom.count("<img") == len(samples)
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,900", url], capture_output=True, timeout=120)
    assert Image.open(shot).size == (1200, 900)
    shutil.copy(shot, out / "screenshot.png")


def test_svg_plots_are_well_formed_xml():
    import xml.etree.ElementTree as ET

    for svg in (svg_bars([5, 3, 1]), svg_recall({"t2v": {"1": 10.0, "5": 40.0, "10": 60.0}})):
        root = ET.fromstring(svg)
        assert root.tag.endswith("svg")
    assert "<polyline" in svg_recall({"t2v": {"1": 10.0, "10": 50.0}})


def test_pca_separates_two_groups():
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(0, 0.1, (20, 8)) + 1, rng.normal(0, 0.1, (20, 8)) - 1]
    xy = pca_2d(x)
    assert np.sign(xy[:20, 0]).tolist() != np.sign(xy[20:, 0]).tolist()
    assert abs(xy[:20, 0].mean() - xy[20:, 0].mean()) > 2


@pytest.fixture(scope="module")
def selflabel_embedding(tiny_dataset, tmp_path_factory):
    """What `vatp embed` writes for a self-labelling model: backbone features and head logits, no shared space."""
    samples = shard_meta(tiny_dataset)  # one video per synth class: two groups of four make a class protocol
    for s in samples:
        s["label"] = f"group{s['idx'] % 2}"
    labels = sorted({s["label"] for s in samples})
    code = np.array([labels.index(s["label"]) for s in samples])
    rng = np.random.default_rng(1)
    feat = 5.0 * rng.standard_normal((len(labels), 32))[code] + 0.2 * rng.standard_normal((len(samples), 32))
    logits = np.stack([np.eye(len(labels))[code] * 6.0, rng.standard_normal((len(samples), len(labels)))])  # (H, N, K)
    meta = [{"idx": s["idx"], "id": s["id"], "label": s["label"], "captions": []} for s in samples]
    emb = write_embedding_dir(tmp_path_factory.mktemp("sl"), meta, {"video_feat": feat, "video_logits": logits})
    return emb, samples, labels


def test_retrieval_without_a_shared_space_still_runs_the_class_protocols(selflabel_embedding):
    emb, samples, _ = selflabel_embedding
    assert main(["eval", "retrieval", str(emb)]) == 0
    out = json.loads((emb / "retrieval.json").read_text())
    assert out["classes"]["protocol"] == "leave-one-out" and out["classes"]["space"] == "video_feat"
    assert out["knn"]["top1"] == 100.0 and out["video->video"]["R@1"] == 100.0


def test_cluster_and_report_work_from_features_and_from_the_heads(selflabel_embedding, tiny_dataset, tmp_path, capsys):
    emb, samples, labels = selflabel_embedding
    assert (
        main(
            ["eval", "cluster", str(emb), "--k", str(len(labels)), "--set", "shots=[1]", "--out", str(tmp_path / "km")]
        )
        == 0
    )
    km = json.loads((tmp_path / "km" / "clusters.json").read_text())
    assert km["space"] == "video_feat" and km["metrics"]["nmi"] == pytest.approx(1.0)
    assert (
        main(["eval", "cluster", str(emb), "--set", "method=heads", "--set", "shots=[1]", "--out", str(tmp_path / "h")])
        == 0
    )
    heads = json.loads((tmp_path / "h" / "clusters.json").read_text())
    assert heads["head"] == 0 and heads["metrics"]["nmi"] == pytest.approx(1.0)  # head 0 holds the classes
    assert main(["eval", "cluster", str(emb), "--space", "video_logits", "--out", str(tmp_path / "bad")]) == 2
    assert "method=heads" in capsys.readouterr().err
    out = tmp_path / "report"
    assert main(["report", str(emb), "--data", str(tiny_dataset), "--set", "method=heads", "--out", str(out)]) == 0
    assert (out / "index.html").read_text().count("<section class='cluster'") == len(labels)

"""Retrieval metrics on hand-built similarity matrices (ties, several captions, collapse) and from embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from eval.retrieval import TIE, class_retrieval, metrics_from_ranks, retrieval_metrics, retrieval_ranks


def test_identity_is_perfect():
    m = retrieval_metrics(np.eye(5))
    assert (m["R@1"], m["R@5"], m["R@10"], m["MedR"], m["MnR"]) == (100.0, 100.0, 100.0, 1.0, 1.0)


def test_hand_built_ranks():
    # query 0: correct item second; query 1: first; query 2: last of 3
    sim = np.array([[0.5, 0.9, 0.1], [0.0, 0.8, 0.2], [0.3, 0.2, 0.1]])
    m = retrieval_metrics(sim)
    assert m["R@1"] == pytest.approx(100 / 3)
    assert m["MedR"] == 2.0
    assert m["MnR"] == pytest.approx((2 + 1 + 3) / 3)


def test_ties_count_against_the_query():
    # CLIP4Clip's worked example: row 0's correct score ties with column 1 -> pessimistic rank 2
    sim = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    m = retrieval_metrics(sim)
    assert m["R@1"] == pytest.approx(75.0)  # CLIP4Clip reports 80% by listing both tied positions
    assert m["MnR"] == pytest.approx(5 / 4)


def test_collapsed_model_scores_last_not_first():
    g = 20
    m = retrieval_metrics(np.full((g, g), 0.3))
    assert m["R@1"] == 0.0 and m["R@10"] == 0.0
    assert m["MedR"] == g and m["MnR"] == g


def test_several_correct_items_use_the_best_one():
    # video -> text: video 0 owns captions 0,1; video 1 owns caption 2
    sim = np.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.6]])
    m = retrieval_metrics(sim, gt=[np.array([0, 1]), np.array([2])])
    assert m["R@1"] == 50.0  # video 0 finds caption 1 first; video 1 is beaten by caption 0
    assert m["MnR"] == pytest.approx(1.5)


def test_other_correct_items_do_not_push_a_query_down():
    sim = np.array([[0.9, 0.9, 0.9, 0.1]])
    assert retrieval_metrics(sim, gt=[np.array([0, 1, 2])])["MedR"] == 1.0


def test_bad_gt_is_rejected():
    with pytest.raises(ValueError, match="out of range"):
        retrieval_metrics(np.eye(3), gt=[[0], [1], [5]])
    with pytest.raises(ValueError, match="no correct"):
        retrieval_metrics(np.eye(2), gt=[[0], []])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan]]))


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_exact_ranks_from_embeddings_match_the_full_matrix_in_small_chunks():
    rng = np.random.default_rng(0)
    gallery = unit(rng.standard_normal((300, 32)))
    queries = unit(gallery[:200] + 0.9 * rng.standard_normal((200, 32)))
    sim = queries.astype(np.float64) @ gallery.T.astype(np.float64)
    # by hand: 1 + incorrect items within TIE of (or above) the correct score
    expected = (sim >= np.diag(sim)[:, None] - TIE).sum(1)
    # memory_mb=0 forces one query per chunk
    ranks = retrieval_ranks(queries, gallery, method="exact", memory_mb=0, progress=False)
    np.testing.assert_array_equal(ranks, expected)
    assert metrics_from_ranks(ranks)["MnR"] == pytest.approx(retrieval_metrics(sim)["MnR"], rel=0.02)


def test_exact_ranks_collapsed_embeddings_score_last():
    emb = np.ones((50, 8), dtype=np.float32) / np.sqrt(8)
    ranks = retrieval_ranks(emb, emb, progress=False)
    assert (ranks == 50).all()


def test_flat_topk_ranks_agree_below_k_and_censor_above():
    rng = np.random.default_rng(1)
    gallery = unit(rng.standard_normal((400, 16)))
    queries = unit(gallery[:100] + 1.2 * rng.standard_normal((100, 16)))
    exact = retrieval_ranks(queries, gallery, progress=False)
    topk = retrieval_ranks(queries, gallery, method="flat", k=20)
    inside = exact <= 20
    np.testing.assert_array_equal(topk[inside], exact[inside])
    assert (topk[~inside] == 21).all() and (~inside).any()
    m = metrics_from_ranks(topk, censored_at=20)
    assert m["MnR"] is None and m["censored"] == int((~inside).sum())
    assert m["R@10"] == pytest.approx(metrics_from_ranks(exact)["R@10"])
    assert metrics_from_ranks(topk, censored_at=5)["R@10"] is None  # k=5 cannot tell R@10


def test_flat_topk_collapsed_embeddings_are_censored_not_ranked_first():
    emb = np.ones((30, 8), dtype=np.float32) / np.sqrt(8)
    ranks = retrieval_ranks(emb, emb, method="flat", k=5)
    assert (ranks == 6).all()


def test_ivf_ranks_close_to_exact():
    rng = np.random.default_rng(2)
    gallery = unit(rng.standard_normal((2000, 16)))
    queries = unit(gallery[:200] + 0.3 * rng.standard_normal((200, 16)))
    exact = metrics_from_ranks(retrieval_ranks(queries, gallery, progress=False))
    ivf = metrics_from_ranks(retrieval_ranks(queries, gallery, method="ivf", k=10, nlist=16, nprobe=8), censored_at=10)
    assert ivf["R@1"] <= exact["R@1"] + 1e-9  # approximate search can only lose correct answers
    assert ivf["R@1"] >= exact["R@1"] - 5.0


def test_class_retrieval_protocol():
    gallery = unit(np.array([[1, 0], [0, 1], [1, 0.1], [-1, 0]], dtype=np.float32))
    g_labels = np.array([0, 1, 0, 2])
    queries = unit(np.array([[1, 0.05], [0.1, 1], [-1, 0.2]], dtype=np.float32))
    q_labels = np.array([0, 0, 2])
    got = class_retrieval(queries, q_labels, gallery, g_labels, ks=(1, 2, 4))
    # query 0 -> nearest is class 0; query 1 -> class 1 then class 0 (rank 2); query 2 -> class 2 first
    assert got == {"R@1": pytest.approx(200 / 3), "R@2": 100.0, "R@4": 100.0}


def test_class_retrieval_leave_one_out_skips_self():
    x = unit(np.array([[1, 0], [1, 0.01], [0, 1], [0.01, 1]], dtype=np.float32))
    labels = np.array([0, 1, 2, 2])
    got = class_retrieval(x, labels, x, labels, ks=(1,), exclude_self=True)
    assert got["R@1"] == 50.0  # without skipping self every query would find itself


def write_embedding_dir(root, n_videos=12, collapse=False, seed=0):
    """Planted embeddings: caption c of video v and v's audio sit close to v's video vector; 3 classes."""
    import json

    rng = np.random.default_rng(seed)
    video = unit(rng.standard_normal((n_videos, 8)))
    counts = [1 + v % 3 for v in range(n_videos)]  # 1-3 captions per video
    caption_video = np.repeat(np.arange(n_videos), counts)
    text = unit(video[caption_video] + 0.1 * rng.standard_normal((len(caption_video), 8)))
    audio = unit(video + 0.1 * rng.standard_normal(video.shape))
    if collapse:
        video[:] = text[:] = audio[:] = unit(np.ones((1, 8)))
    root.mkdir()
    with open(root / "meta.jsonl", "w") as f:
        for v in range(n_videos):
            m = {"row": v, "idx": v, "id": f"v{v}", "label": f"class{v % 3}", "has_audio": v != 0}
            f.write(json.dumps({**m, "captions": [f"c{i}" for i in range(counts[v])]}) + "\n")
    for name, a in {"video@vt": video, "text@vt": text, "video@va": video, "audio@va": audio}.items():
        np.save(root / f"{name}.npy", a.astype(np.float16))
    np.save(root / "caption_video.npy", caption_video)
    (root / "embed.json").write_text("{}")
    return root


def test_eval_retrieval_command_on_planted_embeddings(tmp_path, capsys):
    import json

    from launch.cli import main

    emb = write_embedding_dir(tmp_path / "emb")
    assert main(["eval", "retrieval", str(emb)]) == 0
    out = json.loads((emb / "retrieval.json").read_text())
    for name in ("text->video@vt", "video->text@vt", "audio->video@va", "video->audio@va"):
        assert out[name]["R@1"] == 100.0 and out[name]["MedR"] == 1.0
    assert out["text->video@vt"]["queries"] == sum(1 + v % 3 for v in range(12))
    assert out["audio->video@va"]["gallery"] == 11  # video 0 has no audio
    assert set(out["video->video"]) == {"R@1", "R@5", "R@10", "R@20", "R@50"}
    assert "knn" in out and "linear" in out
    assert "text->video@vt" in capsys.readouterr().out


def test_eval_retrieval_command_collapsed_model_scores_at_the_bottom(tmp_path):
    import json

    from launch.cli import main

    emb = write_embedding_dir(tmp_path / "emb", collapse=True)
    argv = ["eval", "retrieval", str(emb), "--set", "classes=false", "--set", "directions=[text->video@vt]"]
    assert main(argv) == 0
    out = json.loads((emb / "retrieval.json").read_text())
    assert list(out) == ["text->video@vt"]
    assert out["text->video@vt"]["R@1"] == 0.0 and out["text->video@vt"]["MedR"] == 12.0


@pytest.mark.parametrize("method", ["exact", "flat"])
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_embeddings_are_rejected_not_ranked_first(method, bad):
    rng = np.random.default_rng(0)
    x = unit(rng.standard_normal((6, 8)))
    diverged = x.copy()
    diverged[2, 3] = bad
    for queries, gallery, name in ((diverged, x, "queries"), (x, diverged, "gallery")):
        with pytest.raises(ValueError, match=f"{name} has 1 of 6 rows with NaN or inf \\(first: row 2\\)"):
            retrieval_ranks(queries, gallery, method=method, progress=False)
    with pytest.raises(ValueError, match="NaN or inf"):
        retrieval_metrics(np.where(np.eye(3) > 0, np.nan, 0.0))


def test_duplicate_correct_items_count_once():
    sim = np.array([[0.9, 0.1], [0.2, 0.8]])
    m = retrieval_metrics(sim, [np.array([0, 0]), [1]])
    assert m["MedR"] == 1.0 and m["MnR"] == 1.0
    sim = np.array([[0.1, 0.9, 0.5], [0.2, 0.3, 0.8]])
    m = retrieval_metrics(sim, [np.array([0, 0, 0]), np.array([2, 2])])  # query 0: item 0 is third
    assert m["MnR"] == 2.0 and m["R@1"] == 50.0
    queries = unit(np.array([[1.0, 0.5, 0.2], [0.0, 1.0, 0.1], [0.1, 0.2, 1.0]]))
    for method in ("exact", "flat"):
        ranks = retrieval_ranks(queries, np.eye(3), [np.array([1, 1]), [1], [2, 2, 2]], method=method, progress=False)
        assert ranks.tolist() == [2, 1, 1]

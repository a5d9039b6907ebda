"""FAISS indexes: exact flat search equals brute force, chunking changes nothing, IVF trades little recall."""

from __future__ import annotations

import numpy as np
import pytest

from eval import faiss_index as fi


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return unit(rng.standard_normal((500, 24))), unit(rng.standard_normal((70, 24)))


def test_flat_search_equals_brute_force(data):
    gallery, queries = data
    scores, ids = fi.search(fi.build_index(gallery, gpu=False), queries, 5)
    brute = queries @ gallery.T
    np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1)[:, :5])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, ids, 1), atol=1e-5)


def test_chunked_search_equals_one_shot(data):
    gallery, queries = data
    index = fi.build_index(gallery, gpu=False)
    a = fi.search(index, queries, 7, chunk=8)
    b = fi.search(index, queries, 7, chunk=10_000)
    np.testing.assert_array_equal(a[1], b[1])


def test_k_larger_than_gallery_pads_with_minus_one(data):
    gallery, queries = data
    scores, ids = fi.knn(queries[:3], gallery[:4], 6, gpu=False)
    assert (ids[:, 4:] == -1).all() and np.isneginf(scores[:, 4:]).all()
    assert sorted(ids[0, :4].tolist()) == [0, 1, 2, 3]


def test_ivf_recall_at_10_is_high_with_enough_probes():
    rng = np.random.default_rng(1)
    gallery = unit(rng.standard_normal((4000, 16)))
    queries = unit(gallery[:200] + 0.2 * rng.standard_normal((200, 16)))
    _, exact = fi.knn(queries, gallery, 10, gpu=False)
    _, approx = fi.knn(queries, gallery, 10, kind="ivf", nlist=32, nprobe=16, gpu=False)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.9
    _, probe1 = fi.knn(queries, gallery, 10, kind="ivf", nlist=32, nprobe=1, gpu=False)
    assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(probe1, exact)]) < recall


def test_bad_inputs_are_named(data):
    gallery, queries = data
    with pytest.raises(ValueError, match="dimension"):
        fi.search(fi.build_index(gallery, gpu=False), queries[:, :5], 3)
    with pytest.raises(ValueError, match="kind"):
        fi.build_index(gallery, kind="hnsw")
    with pytest.raises(ValueError, match="empty"):
        fi.build_index(np.zeros((0, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        fi.build_index(np.zeros(4, dtype=np.float32))


@pytest.mark.skipif(fi.gpu_available(), reason="checks the error raised when no GPU is visible")
def test_asking_for_a_gpu_without_one_is_an_error(data):
    with pytest.raises(ValueError, match="sees no GPU"):
        fi.build_index(data[0], gpu=True)


@pytest.mark.gpu
def test_gpu_flat_index_matches_cpu(data):
    gallery, queries = data
    cpu = fi.knn(queries, gallery, 10, gpu=False)
    gpu = fi.knn(queries, gallery, 10, gpu=True)
    np.testing.assert_array_equal(cpu[1], gpu[1])


def test_set_threads_rejects_zero():
    with pytest.raises(ValueError, match="thread"):
        fi.set_threads(0)
    assert fi.set_threads(1) == 1

"""Evaluation: embedding extraction, FAISS retrieval and clustering, metrics, reports, search."""

"""Zero-shot classification from class names: each class is the mean of its prompts' text embeddings, each video is
assigned the classes its embedding is most similar to.

    prompts = class_prompts(["ApplyEyeMakeup", "playing_guitar"], ("a video of {}.", "{}"))
    classes = class_embeddings(model, prompts, space="vt")        # (C, D) unit rows, prompt ensembling
    zero_shot_accuracy(video @ classes.T, labels)                  # {"top1": %, "top5": %}

Prompt ensembling as CLIP's: the prompts of a class are embedded, normalised, averaged and normalised again, and
classes are ranked by cosine. In a space the model compares by the dot product (`normalize: false`, the MIL-NCE
release's `vt`) the similarity follows the space, as retrieval's does: the raw prompt embeddings are averaged and
classes ranked by the dot product (`similarity_of`). Class names are turned into words first (CamelCase and
underscores split, lower case), since tokenizers trained on narration have never seen "ApplyEyeMakeup".
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

DEFAULT_TEMPLATES = ("{}", "a video of {}.", "a person {}.", "how to {}.")


def class_words(name: str) -> str:
    """`ApplyEyeMakeup` -> `apply eye makeup`, `playing_guitar` -> `playing guitar`, `YoYo` -> `yo yo`."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name.strip())
    return " ".join(re.split(r"[\s_\-]+", spaced)).lower().strip()


def class_prompts(names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[list[str]]:
    """Every template filled with every class name's words: one list of prompts per class."""
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise ValueError(f"prompt templates must each hold exactly one '{{}}', got {list(templates)!r}")
    if len(set(names)) != len(names):
        raise ValueError("class names must be distinct")
    return [[t.format(class_words(n)) for t in templates] for n in names]


def ensemble(prompt_embeddings: np.ndarray, similarity: str = "cosine") -> np.ndarray:
    """`(C, T, D)` prompt embeddings -> `(C, D)` class embeddings: the mean of the unit prompt embeddings made unit
    again (cosine), or the plain mean of the raw ones (dot)."""
    x = np.asarray(prompt_embeddings, dtype=np.float32)
    if similarity == "dot":
        return x.mean(1)
    if similarity != "cosine":
        raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    mean = x.mean(1)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def similarity_of(model, space: str) -> str:
    """How `model` compares in `space`: "dot" for a space it declares `normalize: false`, else "cosine"."""
    return "dot" if space in getattr(model.module, "dot_product_spaces", ()) else "cosine"


def class_embeddings(model, prompts: list[list[str]], space: str = "vt", similarity: str | None = None) -> np.ndarray:
    """`(C, D)` class embeddings of a model's text tower in `space` (`eval.embed.load_model`), ensembled for the
    space's similarity (`similarity_of` unless given)."""
    from eval.embed import embed_texts

    similarity = similarity or similarity_of(model, space)
    flat = [p for ps in prompts for p in ps]
    per_class = len(prompts[0])
    raw = embed_texts(model, flat, space, normalize=similarity == "cosine")
    return ensemble(raw.reshape(len(prompts), per_class, -1), similarity)


def zero_shot_accuracy(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy (%) of `scores (N, C)` against integer `labels (N,)`; a tie with the true class counts
    against it (a model that scores every class alike is at chance, not perfect)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if scores.ndim != 2 or len(scores) != len(labels):
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} do not match")
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError("labels must be class indices in [0, C) and there must be at least one")
    true = scores[np.arange(len(labels)), labels][:, None]
    rank = (scores >= true).sum(1)  # 1-based, ties pessimistic
    return {f"top{k}": float(100.0 * np.mean(rank <= k)) for k in ks if k <= scores.shape[1]}

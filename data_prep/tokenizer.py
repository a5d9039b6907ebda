"""A sentencepiece tokenizer trained on a built dataset's captions, and batch encoding for the loader.

Training reads only the `<key>.json` members of the shards (stdlib `tarfile` + `json.loads`, nothing
unpickled), trains single-threaded with a fixed seed and no input shuffling, so the same dataset gives
the same `tokenizer.model` bytes. Ids: 0 = <pad>, 1 = <unk>, no BOS/EOS (the text towers pool over
tokens and need no sentence markers). Text is NFKC-normalised and case-folded (`nmt_nfkc_cf`).
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import sentencepiece as spm
import torch
from tqdm import tqdm

from data_prep.shards import iter_json_members

log = logging.getLogger(__name__)

TOKENIZER_NAME = "tokenizer.model"
PAD_ID, UNK_ID = 0, 1
MAX_SENTENCES = 5_000_000  # input_sentence_size: bounds the trainer's memory on huge corpora
MODEL_TYPES = ("unigram", "bpe", "word", "char")


def train_tokenizer(
    dataset_dir: str | Path, *, vocab_size: int = 8000, model_type: str = "unigram", seed: int = 0
) -> Path:
    """Train sentencepiece on every caption in `<dataset_dir>/shards/*.tar`; writes `<dataset_dir>/tokenizer.model`.

    `vocab_size` is an upper bound (small corpora give fewer pieces). Raises ValueError when the
    dataset has no shards or no caption text.
    """
    dataset = Path(dataset_dir)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not one of {MODEL_TYPES}")
    if vocab_size < 3:
        raise ValueError(f"vocab_size {vocab_size} is too small (at least 3: <pad>, <unk> and one piece)")
    shards = sorted((dataset / "shards").glob("*.tar"))
    if not shards:
        raise ValueError(f"{dataset}: no shards/*.tar (is this a dataset built by `vatp data build`?)")
    texts, stats = _read_captions(shards)
    if not texts:
        raise ValueError(
            f"{dataset}: the dataset has no caption text to train a tokenizer on ({stats['samples']} samples)"
        )
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            hard_vocab_limit=False,
            character_coverage=1.0,
            normalization_rule_name="nmt_nfkc_cf",
            num_threads=1,
            shuffle_input_sentence=False,
            input_sentence_size=MAX_SENTENCES,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            eos_id=-1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"{dataset}: sentencepiece training failed with vocab_size={vocab_size}: {e}") from e
    out = dataset / TOKENIZER_NAME
    tmp = out.with_name(f".{TOKENIZER_NAME}.tmp{os.getpid()}")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out)
    size = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    log.info(
        "%s: vocab %d (asked %d, %s) from %d captions in %d samples / %d shards%s",
        out,
        size,
        vocab_size,
        model_type,
        len(texts),
        stats["samples"],
        len(shards),
        f"; {stats['bad_json']} unreadable json member(s) skipped" if stats["bad_json"] else "",
    )
    return out


def _read_captions(shards: list[Path]) -> tuple[list[str], dict[str, int]]:
    texts, samples, bad = [], 0, []
    for shard in tqdm(shards, desc="tokenizer: read", unit="shard", leave=False, disable=None):
        for _, meta in iter_json_members(shard, bad=bad):
            samples += 1
            captions = meta.get("captions")
            for caption in captions if isinstance(captions, list) else []:
                text = caption.get("text") if isinstance(caption, dict) else None
                if isinstance(text, str) and text.strip():
                    texts.append(" ".join(text.split()))  # a newline would split one sentence in two
    return texts, {"samples": samples, "bad_json": len(bad)}


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    """Load a `tokenizer.model` (or the one inside a dataset directory); it must use pad id 0."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_NAME
    if not path.is_file():
        raise ValueError(f"tokenizer not found: {path} (train one with `vatp data tokenizer <dataset>`)")
    tok = spm.SentencePieceProcessor(model_file=str(path))
    if tok.pad_id() != PAD_ID:
        raise ValueError(f"{path}: pad id is {tok.pad_id()}, expected {PAD_ID} (train it with `vatp data tokenizer`)")
    return tok


def encode_batch(
    tok: spm.SentencePieceProcessor, texts: list[str], max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids int64 (N, max_tokens), right-padded with 0 and truncated, and the bool mask of real tokens."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    ids = torch.full((len(texts), max_tokens), PAD_ID, dtype=torch.int64)  # (N, L)
    # One thread: the loader already runs one worker per core, and the thread pool costs more than it saves.
    for row, pieces in enumerate(tok.encode(list(texts), num_threads=1) if texts else []):
        pieces = pieces[:max_tokens]
        ids[row, : len(pieces)] = torch.tensor(pieces, dtype=torch.int64)
    return ids, ids != PAD_ID

"""A sentencepiece tokenizer trained on a built dataset's captions (loading and encoding: `pipeline/dataset.py`).

Training reads only the `<key>.json` members of the shards (stdlib `tarfile` + `json.loads`, nothing
unpickled), trains single-threaded with a fixed seed and no input shuffling, so the same dataset gives
the same `tokenizer.model` bytes. Ids: 0 = <pad>, 1 = <unk>, no BOS/EOS (the text towers pool over
tokens and need no sentence markers). Text is NFKC-normalised and case-folded (`nmt_nfkc_cf`).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from pipeline.dataset import PAD_ID, TOKENIZER_NAME, UNK_ID, iter_json_members, shard_paths
from pipeline.files import atomic_write

log = logging.getLogger(__name__)

MAX_SENTENCES = 5_000_000  # input_sentence_size: bounds the trainer's memory on huge corpora
MODEL_TYPES = ("unigram", "bpe", "word", "char")


def train_tokenizer(
    dataset_dir: str | Path, *, vocab_size: int = 8000, model_type: str = "unigram", seed: int = 0
) -> Path:
    """Train sentencepiece on every caption in the shards of `dataset.json`; writes `<dataset_dir>/tokenizer.model`.

    `vocab_size` is an upper bound (small corpora give fewer pieces). Raises ValueError when the
    dataset has no shards or no caption text.
    """
    dataset = Path(dataset_dir)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not one of {MODEL_TYPES}")
    if vocab_size < 3:
        raise ValueError(f"vocab_size {vocab_size} is too small (at least 3: <pad>, <unk> and one piece)")
    shards = shard_paths(dataset)
    if not shards:
        raise ValueError(f"{dataset}: dataset.json lists no shards")
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
    with atomic_write(out, "wb") as f:
        f.write(model.getvalue())
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

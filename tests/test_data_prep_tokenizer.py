"""Tokenizer training on a hand-made shard directory, loading, and batch encoding (padding, truncation, mask)."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile

import pytest
import sentencepiece as spm
import torch

from data_prep.tokenizer import train_tokenizer
from pipeline.dataset import encode_batch, load_tokenizer

SENTENCES = [
    "crack two eggs into the bowl",
    "whisk the batter until smooth",
    "pour the batter into the pan",
    "flip the pancake and cook the other side",
    "loosen the bolt with a wrench",
    "the dog runs across the park",
    "a man plays the guitar on stage",
    "slice the onion and the carrots",
]


def _member(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _make_dataset(root, captions_per_sample, extra_members=()):
    """A dataset dir like the builder writes: shards/NNNNNN.tar with <key>.json (+ a fake .mp4) and dataset.json."""
    (root / "shards").mkdir(parents=True)
    per_shard = 3
    shards = []
    for shard in range(0, len(captions_per_sample), per_shard):
        shards.append(
            {"name": f"{shard // per_shard:06d}.tar", "samples": min(per_shard, len(captions_per_sample) - shard)}
        )
        with tarfile.open(root / "shards" / shards[-1]["name"], "w") as tar:
            for idx in range(shard, min(shard + per_shard, len(captions_per_sample))):
                key = f"{idx:06d}"
                caps = [{"start": 0.0, "end": 1.0, "text": t} for t in captions_per_sample[idx]]
                meta = {"id": f"v{idx}", "idx": idx, "captions": caps, "label": "qzj qzj"}
                _member(tar, f"{key}.mp4", b"\0" * 32)
                _member(tar, f"{key}.json", json.dumps(meta).encode())
            for name, data in extra_members if shard == 0 else ():
                _member(tar, name, data)
    (root / "dataset.json").write_text(json.dumps({"format": "vatp-shards", "version": 1, "shards": shards}))
    return root


def _corpus():
    return [SENTENCES[i : i + 2] for i in range(0, len(SENTENCES), 2)] * 3


def test_train_is_deterministic_and_respects_vocab(tmp_path, caplog):
    a = _make_dataset(tmp_path / "a", _corpus(), extra_members=[("999999.json", b"{not json")])
    b = tmp_path / "b"
    shutil.copytree(a, b)
    with caplog.at_level(logging.INFO):
        path_a = train_tokenizer(a, vocab_size=60, seed=0)
    path_b = train_tokenizer(b, vocab_size=60, seed=0)
    assert path_a == a / "tokenizer.model" and path_a.is_file()
    assert path_a.read_bytes() == path_b.read_bytes()
    assert not list(a.glob(".tokenizer.model.*.tmp"))
    tok = load_tokenizer(a)
    assert 3 <= tok.get_piece_size() <= 60
    assert (tok.pad_id(), tok.unk_id(), tok.bos_id(), tok.eos_id()) == (0, 1, -1, -1)
    assert "1 unreadable json" in caplog.text
    # the label is not training text: its letters (absent from every caption) stay unknown
    assert all(tok.piece_to_id(ch) == tok.unk_id() for ch in "qzj")


def test_bpe_and_bad_arguments(tmp_path):
    ds = _make_dataset(tmp_path / "d", _corpus())
    assert load_tokenizer(train_tokenizer(ds, vocab_size=50, model_type="bpe")).get_piece_size() <= 50
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(ds, model_type="wordpiece")
    with pytest.raises(ValueError, match="vocab_size=5"):
        train_tokenizer(ds, vocab_size=5)  # fewer pieces than distinct characters


def test_dataset_without_captions_is_an_error(tmp_path):
    ds = _make_dataset(tmp_path / "silent", [[], [" "], []])
    with pytest.raises(ValueError, match="silent"):
        train_tokenizer(ds)
    with pytest.raises(ValueError, match="dataset.json not found"):
        train_tokenizer(tmp_path / "missing")


def test_encode_batch_pads_truncates_and_masks(tmp_path):
    ds = _make_dataset(tmp_path / "e", _corpus())
    tok = load_tokenizer(train_tokenizer(ds, vocab_size=60))
    texts = ["the bowl", "", "flip the pancake and cook the other side of the pan twice"]
    full = tok.encode(texts)
    n0, max_tokens = len(full[0]), len(full[0]) + 3
    ids, mask = encode_batch(tok, texts, max_tokens=max_tokens)
    assert ids.shape == mask.shape == (3, max_tokens)
    assert ids.dtype == torch.int64 and mask.dtype == torch.bool
    assert ids[0, :n0].tolist() == full[0] and mask[0, :n0].all() and not mask[0, n0:].any()
    assert (ids[0, n0:] == 0).all()
    assert not mask[1].any() and (ids[1] == 0).all()
    assert len(full[2]) > max_tokens and ids[2].tolist() == full[2][:max_tokens] and mask[2].all()
    assert encode_batch(tok, [], max_tokens=4)[0].shape == (0, 4)
    with pytest.raises(ValueError, match="max_tokens"):
        encode_batch(tok, texts, max_tokens=0)


def test_load_tokenizer_rejects_foreign_models(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_tokenizer(tmp_path)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 3), model_writer=model, vocab_size=40, hard_vocab_limit=False, minloglevel=2
    )
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())  # sentencepiece defaults: no pad id
    with pytest.raises(ValueError, match="pad id"):
        load_tokenizer(tmp_path / "tokenizer.model")


def test_train_on_the_built_tiny_dataset(tiny_dataset, tmp_path):
    ds = tmp_path / "copy"  # a copy: the session dataset is shared with other tests
    shutil.copytree(tiny_dataset / "shards", ds / "shards")
    shutil.copyfile(tiny_dataset / "dataset.json", ds / "dataset.json")
    tok = load_tokenizer(train_tokenizer(ds, vocab_size=300))
    texts = []
    for shard in sorted((ds / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    texts += [c["text"] for c in json.loads(tar.extractfile(m).read())["captions"]]
    assert texts and tok.get_piece_size() <= 300
    ids, mask = encode_batch(tok, texts, max_tokens=64)
    assert (ids[mask] != tok.unk_id()).all()  # every caption character was in the training text
    assert [tok.decode(row[m].tolist()) for row, m in zip(ids, mask)] == [" ".join(t.lower().split()) for t in texts]

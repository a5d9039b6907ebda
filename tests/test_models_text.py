"""Text towers: padding never changes the embedding, empty captions stay finite, frozen embeddings, vocab size."""

from __future__ import annotations

import pytest
import torch

from models import build_encoder
from models.contracts import TextInput

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TOWERS = ["text_tiny", "text_transformer_tiny"]


@pytest.mark.parametrize("name", TOWERS)
def test_padding_does_not_change_the_embedding(name):
    tower = build_encoder(name, embed_dim=8).eval()
    ids = torch.randint(1, 1000, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False  # a shorter caption inside the same batch
    ids[1, 3:] = 0
    # The same captions padded to 16 tokens, with garbage ids under the mask (only the mask may matter).
    ids16 = torch.randint(1, 1000, (3, 16))
    ids16[:, :5] = ids
    mask16 = torch.zeros(3, 16, dtype=torch.bool)
    mask16[:, :5] = mask
    with torch.no_grad():
        short, padded = tower(ids, mask), tower(ids16, mask16)
        alone = tower(ids[1:2, :3], mask[1:2, :3])
    torch.testing.assert_close(padded, short, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone[0], short[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(short[0], short[2])


@pytest.mark.parametrize("name", TOWERS)
def test_all_padding_rows_give_zero_features_and_finite_gradients(name):
    tower = build_encoder(name)
    ids = torch.randint(1, 1000, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False
    feats = tower.forward_features(ids, mask)
    assert torch.isfinite(feats).all()
    assert feats[1].abs().max() == 0 and feats[0].abs().max() > 0
    feats.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in tower.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", TOWERS)
def test_frozen_embeddings_get_no_gradient(name):
    tower = build_encoder(name, freeze_embeddings=True)
    assert not tower.word_embd.weight.requires_grad
    ids = torch.randint(1, 1000, (2, 6))
    tower.forward_features(ids, torch.ones_like(ids, dtype=torch.bool)).sum().backward()
    assert tower.word_embd.weight.grad is None
    assert all(p.grad is not None for n, p in tower.named_parameters() if p.requires_grad)


def test_vocab_and_max_tokens_come_from_the_contract():
    tower = build_encoder("text_tiny", contract=TextInput(max_tokens=12, vocab_size=37))
    assert tower.word_embd.num_embeddings == 37 and tower.input_contract.vocab_size == 37
    transformer = build_encoder("text_transformer_tiny", contract=TextInput(max_tokens=12, vocab_size=50))
    assert transformer.pos_embd.shape[0] == 12 and transformer.word_embd.num_embeddings == 50
    ids = torch.ones(1, 13, dtype=torch.long)
    with pytest.raises(ValueError, match="max_tokens=12"):
        transformer(ids, torch.ones_like(ids, dtype=torch.bool))


def test_freeze_embeddings_is_refused_for_non_text_towers():
    with pytest.raises(ValueError, match="text encoders only"):
        build_encoder("audio_tiny", freeze_embeddings=True)

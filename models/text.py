"""Text towers on sentencepiece ids `(N, L)` with a bool mask `(N, L)` (True = real token; `PAD_ID` is padding).

- `MilNCEText`: embedding -> Linear(2048) + ReLU -> max over the real tokens -> optional Linear (MIL-NCE's fc2).
  Unlike the released word2vec tower (models/s3d.py `Word2VecText`), padding is masked: a padded position
  contributes 0, which never wins a max over post-ReLU values, so padding cannot change the embedding.
- `TransformerText`: embedding + learned positions -> pre-norm Transformer encoder with a key-padding mask ->
  mean over the real tokens.
Rows whose mask is all False (padding captions) give an all-zero feature, never NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.contracts import PAD_ID


class MilNCEText(nn.Module):
    """MIL-NCE sentence encoder; `forward_features -> (N, hidden)`, `forward -> (N, embed_dim)` when fc2 exists."""

    def __init__(
        self,
        vocab_size: int,
        *,
        word_dim: int = 300,
        hidden: int = 2048,
        embed_dim: int | None = 512,
        freeze_embeddings: bool = False,
    ):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"text vocab_size must be >= 2 ({PAD_ID} is padding), got {vocab_size}")
        self.word_embd = nn.Embedding(vocab_size, word_dim)
        self.word_embd.weight.requires_grad_(not freeze_embeddings)
        self.fc1 = nn.Linear(word_dim, hidden)
        self.feature_dim = hidden
        self.embed_dim = embed_dim
        self.fc2 = nn.Linear(hidden, embed_dim) if embed_dim else None

    def forward_features(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Max-pooled features `(N, hidden)`; padded positions are zeroed after the ReLU, so they never win."""
        x = F.relu(self.fc1(self.word_embd(ids)))  # (N, L, hidden)
        x = x * mask.unsqueeze(-1).to(x.dtype)
        return x.amax(dim=1)

    def project(self, features: Tensor) -> Tensor:
        return self.fc2(features) if self.fc2 is not None else features

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.project(self.forward_features(ids, mask))


class TransformerText(nn.Module):
    """Small pre-norm Transformer encoder; `forward_features -> (N, d_model)` (masked mean of the outputs)."""

    def __init__(
        self,
        vocab_size: int,
        *,
        max_tokens: int,
        d_model: int = 256,
        layers: int = 4,
        heads: int = 4,
        dropout: float = 0.1,
        embed_dim: int | None = None,
        freeze_embeddings: bool = False,
    ):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"text vocab_size must be >= 2 ({PAD_ID} is padding), got {vocab_size}")
        self.word_embd = nn.Embedding(vocab_size, d_model)
        self.word_embd.weight.requires_grad_(not freeze_embeddings)
        self.pos_embd = nn.Parameter(torch.zeros(max_tokens, d_model))
        nn.init.normal_(self.pos_embd, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.max_tokens = max_tokens
        self.feature_dim = d_model
        self.embed_dim = embed_dim
        self.fc = nn.Linear(d_model, embed_dim) if embed_dim else None

    def forward_features(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Masked mean of the encoder outputs `(N, d_model)`; empty rows give zeros."""
        n, length = ids.shape
        if length > self.max_tokens:
            raise ValueError(f"text has {length} tokens, more than this tower's max_tokens={self.max_tokens}")
        present = mask.any(dim=1)  # (N,)
        # An all-padding row would make attention softmax over nothing (NaN): let it see position 0, zero it later.
        attend = mask.clone()
        attend[:, 0] |= ~present
        x = self.word_embd(ids) + self.pos_embd[:length]
        x = self.norm(self.encoder(x, src_key_padding_mask=~attend))  # (N, L, d_model)
        weights = mask.to(x.dtype).unsqueeze(-1)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return pooled * present.unsqueeze(-1).to(pooled.dtype)

    def project(self, features: Tensor) -> Tensor:
        return self.fc(features) if self.fc is not None else features

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.project(self.forward_features(ids, mask))

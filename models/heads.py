"""Projection heads into shared embedding spaces, and self-label heads.

- `ProjectionMLP`: GDT's `MLP` (Dropout -> Linear(no bias) -> BN1d -> ReLU -> Dropout -> Linear). L2
  normalisation is applied by the multi-tower model per space (`SpaceConfig.normalize`), not here, so MMV's
  coarse space can read the fine space's un-normalised output.
- `make_projection(kind, ...)`: "mlp" (the above) or "linear" (one Linear, GDT's no-MLP / MIL-NCE's fc).
- `SelfLabelHeads`: H SeLaVi `MLPv2` heads (Dropout -> Linear(no bias) -> BN1d -> ReLU -> Dropout -> Linear(K)),
  returning raw logits `(H, N, K)`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ProjectionMLP(nn.Sequential):
    """GDT projection MLP `in_dim -> hidden -> out_dim` (un-normalised output)."""

    def __init__(self, in_dim: int, out_dim: int, *, hidden: int = 512, dropout: float = 0.3):
        super().__init__(
            nn.Dropout(dropout),
            nn.Linear(in_dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, out_dim),
        )


def make_projection(kind: str, in_dim: int, out_dim: int, *, hidden: int = 512, dropout: float = 0.3) -> nn.Module:
    """A projection head: "mlp" (GDT's MLP) or "linear"."""
    if kind == "mlp":
        return ProjectionMLP(in_dim, out_dim, hidden=hidden, dropout=dropout)
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    raise ValueError(f"unknown projection head {kind!r} (known: 'mlp', 'linear')")


class SelfLabelHeads(nn.Module):
    """`heads` independent SeLaVi cluster heads on one feature: `(N, in_dim) -> (H, N, clusters)` raw logits."""

    def __init__(self, in_dim: int, heads: int, clusters: int, *, hidden: int = 512, dropout: float = 0.3):
        super().__init__()
        if heads < 1 or clusters < 2:
            raise ValueError(f"self-label heads need heads >= 1 and clusters >= 2, got {heads} x {clusters}")
        self.heads = nn.ModuleList(
            ProjectionMLP(in_dim, clusters, hidden=hidden, dropout=dropout) for _ in range(heads)
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([head(x) for head in self.heads])  # (H, N, K)

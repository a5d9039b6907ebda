"""Projection heads into shared embedding spaces, and self-label heads.

- `ProjectionMLP`: GDT's `MLP` (Dropout -> Linear(no bias) -> BN1d -> ReLU -> Dropout -> Linear). L2
  normalisation is applied by the multi-tower model per space (`SpaceConfig.normalize`), not here, so MMV's
  coarse space can read the fine space's un-normalised output.
- `make_projection(kind, ...)`: "mlp" (the above) or "linear" (one Linear, GDT's no-MLP / MIL-NCE's fc).
- `SelfLabelHeads`: H SeLaVi `MLPv2` heads (Dropout -> Linear(no bias) -> BN1d -> ReLU -> Dropout -> Linear(K)),
  returning raw logits `(H, N, K)`, their cluster axis reordered by the buffer `perm` (H, K) (identity at init).
  SeLaVi aligns the audio heads' clusters with the video heads' at the first labelling by permuting the audio
  head's output rows; here `set_permutation` stores that permutation, so it travels with `state_dict()` and exports.
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
    """`heads` independent SeLaVi cluster heads on one feature: `(N, in_dim) -> (H, N, clusters)` raw logits.

    Output column k of head h is the head's cluster `perm[h, k]` (`perm` is the identity until `set_permutation`).
    """

    def __init__(self, in_dim: int, heads: int, clusters: int, *, hidden: int = 512, dropout: float = 0.3):
        super().__init__()
        if heads < 1 or clusters < 2:
            raise ValueError(f"self-label heads need heads >= 1 and clusters >= 2, got {heads} x {clusters}")
        self.heads = nn.ModuleList(
            ProjectionMLP(in_dim, clusters, hidden=hidden, dropout=dropout) for _ in range(heads)
        )
        self.register_buffer("perm", torch.arange(clusters).repeat(heads, 1))  # (H, K)

    def set_permutation(self, perm: Tensor) -> None:
        """Store `perm` (H, K): output column k of head h becomes the head's own cluster `perm[h, k]`.

        The stored permutation is replaced, not composed, so calling it twice with the same value is harmless.
        """
        perm = torch.as_tensor(perm, dtype=torch.int64)
        h, k = self.perm.shape
        if perm.shape != (h, k):
            raise ValueError(f"cluster permutation must be (H={h}, K={k}), got {tuple(perm.shape)}")
        if not torch.equal(perm.sort(dim=1).values.cpu(), torch.arange(k).repeat(h, 1)):
            raise ValueError(f"each row of the cluster permutation must be a permutation of 0..{k - 1}")
        self.perm.copy_(perm)

    def forward(self, x: Tensor) -> Tensor:
        logits = torch.stack([head(x) for head in self.heads])  # (H, N, K)
        h, n, k = logits.shape
        return torch.gather(logits, 2, self.perm[:, None, :].expand(h, n, k))  # (H, N, K), column k = cluster perm[k]

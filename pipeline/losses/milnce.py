"""MIL-NCE (Miech et al. 2020): one video against K candidate captions, positives twice in the denominator.

Official formula (antoine77340/MIL-NCE_HowTo100M `loss.py`), with x[i, j, k] = <v_i, t_{j,k}> over the GLOBAL batch:

    loss_i = logsumexp_{j,k}( {x[i, j, k]} ∪ {x[j, i, k]} ) - logsumexp_k x[i, i, k]

No L2 normalisation and no temperature unless one is configured. Each rank computes the rows of its own clips
against the batch gathered from every rank with gradients (`pipeline.distributed.all_gather_with_grad`), so the
cost is O(B × W·B·K) per rank instead of the official O((W·B)² K) on every rank; values and DDP-averaged gradients
equal the single-process loss on the concatenated batch.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.distributed import all_gather_no_grad, all_gather_with_grad, global_mean


def milnce_loss(
    video: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    *,
    temperature: float | None = None,
) -> torch.Tensor:
    """MIL-NCE on the global batch. video (B, D), text (B, K, D), text_mask (B, K) bool (True = caption present).

    Clips whose captions are all masked are left out of the mean (they still serve as negatives' videos).
    """
    if video.dim() != 2 or text.dim() != 3 or text.shape[0] != video.shape[0] or text.shape[2] != video.shape[1]:
        raise ValueError(
            f"milnce_loss wants video (B, D) and text (B, K, D), got {tuple(video.shape)} and {tuple(text.shape)}"
        )
    if temperature is not None and temperature <= 0:
        raise ValueError(f"MIL-NCE temperature must be > 0, got {temperature}")
    b, k, d = text.shape
    if text_mask is None:
        text_mask = torch.ones(b, k, dtype=torch.bool, device=text.device)
    elif tuple(text_mask.shape) != (b, k):
        raise ValueError(f"text_mask must be (B, K) = {(b, k)}, got {tuple(text_mask.shape)}")
    text_mask = text_mask.bool()
    video_all = all_gather_with_grad(video)  # (W*B, D)
    text_all = all_gather_with_grad(text)  # (W*B, K, D)
    mask_all = all_gather_no_grad(text_mask)  # (W*B, K)
    scale = 1.0 if temperature is None else 1.0 / temperature
    rows = (video @ text_all.reshape(-1, d).T) * scale  # (B, W*B*K): x[i, j, k], this rank's videos vs every caption
    cols = (text.reshape(b * k, d) @ video_all.T).reshape(b, k, -1) * scale  # (B, K, W*B): x[j, i, k], all videos
    pos = (video[:, None, :] * text).sum(-1) * scale  # (B, K): x[i, i, k]
    # A large finite stand-in for -inf keeps logsumexp's gradient finite even when a whole row is masked.
    rows = rows.masked_fill(~mask_all.reshape(1, -1), torch.finfo(rows.dtype).min)
    cols = cols.masked_fill(~text_mask[:, :, None], torch.finfo(cols.dtype).min)
    pos = pos.masked_fill(~text_mask, torch.finfo(pos.dtype).min)

    denominator = torch.logsumexp(torch.cat([rows, cols.reshape(b, -1)], dim=1), dim=1)  # (B,)
    numerator = torch.logsumexp(pos, dim=1)  # (B,)
    valid = text_mask.any(dim=1)
    per_clip = torch.where(valid, denominator - numerator, torch.zeros_like(numerator))
    return global_mean(per_clip.sum(), valid.sum())


class MilNCE(nn.Module):
    """`forward(out, batch) -> {"milnce": loss}` on `out["video@<space>"]` (B, V, D; view 0) and
    `out["text@<space>"]` (B, K, D); candidate captions present where `batch["text_mask"]` (B, K, L) has any token."""

    def __init__(self, space: str = "vt", temperature: float | None = None):
        super().__init__()
        self.space = space
        self.temperature = temperature

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        vkey, tkey = f"video@{self.space}", f"text@{self.space}"
        if vkey not in out or tkey not in out:
            raise ValueError(f"MIL-NCE needs model outputs {vkey!r} and {tkey!r}; got {sorted(out)}")
        video = out[vkey]
        if video.dim() == 3:
            video = video[:, 0]  # (B, D): MIL-NCE uses one view
        mask = batch.get("text_mask")
        if mask is not None and mask.dim() == 3:
            mask = mask.any(dim=-1)  # (B, K): a caption row is present iff any token is
        return {"milnce": milnce_loss(video, out[tkey], mask, temperature=self.temperature)}

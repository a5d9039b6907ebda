"""GDT (Patrick et al. 2021): cross-modal noise-contrastive loss, invariant or variant to time reversal and shift.

Views (the loader's order, `out["video@va"]` / `out["audio@va"]` (B, V, D)): 0 base, 1 time-reversed,
2 time-shifted, 3 shifted + reversed. A *pair term* on views (x, y) is the official `get_losses`:

    0.25 * [CE(v_x) + CE(a_x) + CE(v_y) + CE(a_y)]

each CE over `cat(q·pos, q·negatives) / t` with L2-normalised features, t = 0.07 and stop-gradient keys
(gradients reach only the queries). For a video query v_x of sample i the keys are the audio features of BOTH
views of EVERY sample on every rank (the local batch included), and

    mode        positive    own other view a_y(i)
    variant     a_x(i)      a negative (the hard negative: the clip must tell the transformed audio apart)
    invariant   a_y(i)      (is the positive; a_x(i) is left out)
    basecase    a_x(i)      left out (the companion of an invariant term must not contradict it)

Audio queries are symmetric with video keys. Hypothesis 1 uses one view: 0.5 CE(v) + 0.5 CE(a), keys of every rank.

| hyp | terms (averaged) |
| 1 | single view |
| 2 / 3 | variant (0, 1) / invariant (0, 1) + basecase (0, 1) |
| 4 / 5 | variant (0, 2) / invariant (0, 2) + basecase (0, 2) |
| 6-9 | reversal r on (0, 1) and (2, 3), shift s on (0, 2) and (1, 3), + basecase (0, 1) if r is invariant, + basecase
|     | (0, 2) if s is invariant; (r, s) = (v, v), (i, v), (v, i), (i, i) for 6, 7, 8, 9 |

Deviations from facebookresearch/GDT (docs/objectives.md): the official negative lists are extended in place and
so carry duplicated other-rank negatives into later terms of hypotheses 3 and 5-9 (not reproduced); the official
takes the non-positive view's keys only from OTHER ranks in invariant/basecase terms, so it fails on one process
and its loss depends on how the batch is split; here every rank's keys count, so one process works and the loss
equals the single-process loss on the concatenated batch. `num_negatives` subsampling is not implemented (the
official default -1 uses all negatives, as here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.distributed import all_gather_no_grad, global_mean, rank

Term = tuple[str, int, int]


def hypothesis_terms(hypothesis: int) -> list[Term]:
    """The (mode, view_x, view_y) pair terms averaged by GDT hypothesis 1-9."""
    simple: dict[int, list[Term]] = {
        1: [("single", 0, 0)],
        2: [("variant", 0, 1)],
        3: [("invariant", 0, 1), ("basecase", 0, 1)],
        4: [("variant", 0, 2)],
        5: [("invariant", 0, 2), ("basecase", 0, 2)],
    }
    if hypothesis in simple:
        return simple[hypothesis]
    if hypothesis not in (6, 7, 8, 9):
        raise ValueError(f"GDT hypothesis must be 1-9, got {hypothesis}")
    rev = "invariant" if hypothesis in (7, 9) else "variant"
    shift = "invariant" if hypothesis in (8, 9) else "variant"
    terms = [(rev, 0, 1), (rev, 2, 3), (shift, 0, 2), (shift, 1, 3)]
    if rev == "invariant":
        terms.append(("basecase", 0, 1))
    if shift == "invariant":
        terms.append(("basecase", 0, 2))
    return terms


def gdt_loss(
    video: torch.Tensor,
    audio: torch.Tensor,
    hypothesis: int = 1,
    *,
    temperature: float = 0.07,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """GDT loss of `hypothesis` on video/audio embeddings (B, V, D); `valid` (B,) bool drops samples without audio."""
    terms = hypothesis_terms(hypothesis)
    needed = 1 + max(max(x, y) for _, x, y in terms)
    if video.dim() != 3 or video.shape != audio.shape or video.shape[1] < needed:
        raise ValueError(
            f"GDT hypothesis {hypothesis} wants video and audio (B, V>={needed}, D) of equal shape, "
            f"got {tuple(video.shape)} and {tuple(audio.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"GDT temperature must be > 0, got {temperature}")
    b = video.shape[0]
    if valid is None:
        valid = torch.ones(b, dtype=torch.bool, device=video.device)
    video, audio = F.normalize(video, dim=-1), F.normalize(audio, dim=-1)
    # Keys are stop-gradient: gather each used view once, detached.
    views = sorted({v for _, x, y in terms for v in (x, y)})
    keys_v = {v: all_gather_no_grad(video[:, v].detach()) for v in views}  # each (W*B, D)
    keys_a = {v: all_gather_no_grad(audio[:, v].detach()) for v in views}
    valid_all = all_gather_no_grad(valid.bool())  # (W*B,)
    own = rank() * b + torch.arange(b, device=video.device)  # global index of this rank's samples

    values = []
    for mode, x, y in terms:
        if mode == "single":
            ce = _nce(video[:, x], keys_a[x], own, None, valid_all, temperature)
            ce = ce + _nce(audio[:, x], keys_v[x], own, None, valid_all, temperature)
            local_sum, per_sample = ce, 2
        else:
            local_sum = _pair_term(
                mode,
                video[:, x],
                audio[:, x],
                video[:, y],
                audio[:, y],
                (keys_v[x], keys_a[x], keys_v[y], keys_a[y]),
                own,
                valid_all,
                temperature,
            )
            per_sample = 4
        local_sum = torch.where(valid, local_sum, torch.zeros_like(local_sum)).sum()
        values.append(global_mean(local_sum / per_sample, valid.sum()))
    return torch.stack(values).mean()


def _pair_term(mode, v_x, a_x, v_y, a_y, keys, own, valid_all, temperature) -> torch.Tensor:
    """Per-sample CE(v_x) + CE(a_x) + CE(v_y) + CE(a_y) of one pair term, (B,)."""
    kv_x, ka_x, kv_y, ka_y = keys
    n = kv_x.shape[0]
    bank_a = torch.cat([ka_x, ka_y])  # (2N, D): view x rows 0..N-1, view y rows N..2N-1
    bank_v = torch.cat([kv_x, kv_y])
    bank_valid = torch.cat([valid_all, valid_all])
    x_idx, y_idx = own, own + n
    if mode == "variant":
        pos_x, pos_y, drop_x, drop_y = x_idx, y_idx, None, None
    elif mode == "invariant":
        pos_x, pos_y, drop_x, drop_y = y_idx, x_idx, x_idx, y_idx
    elif mode == "basecase":
        pos_x, pos_y, drop_x, drop_y = x_idx, y_idx, y_idx, x_idx
    else:
        raise AssertionError(mode)
    total = _nce(v_x, bank_a, pos_x, drop_x, bank_valid, temperature)
    total = total + _nce(a_x, bank_v, pos_x, drop_x, bank_valid, temperature)
    total = total + _nce(v_y, bank_a, pos_y, drop_y, bank_valid, temperature)
    return total + _nce(a_y, bank_v, pos_y, drop_y, bank_valid, temperature)


def _nce(query, bank, pos, drop, bank_valid, temperature) -> torch.Tensor:
    """Per-query cross-entropy of the positive bank row `pos` against all valid rows except `drop`, (B,)."""
    logits = query @ bank.T / temperature  # (B, M)
    rows = torch.arange(query.shape[0], device=query.device)
    excluded = ~bank_valid[None, :].expand_as(logits).clone()
    if drop is not None:
        excluded[rows, drop] = True
    logits = logits.masked_fill(excluded, torch.finfo(logits.dtype).min)
    return torch.logsumexp(logits, dim=1) - logits[rows, pos]


class GDT(nn.Module):
    """`forward(out, batch) -> {"gdt": loss}` on `out["video@<space>"]`, `out["audio@<space>"]` (B, V, D);
    samples with `batch["has_audio"]` False are neither queries nor keys."""

    def __init__(self, hypothesis: int = 1, space: str = "va", temperature: float = 0.07):
        super().__init__()
        hypothesis_terms(hypothesis)  # validates
        self.hypothesis, self.space, self.temperature = hypothesis, space, temperature

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        vkey, akey = f"video@{self.space}", f"audio@{self.space}"
        if vkey not in out or akey not in out:
            raise ValueError(f"GDT needs model outputs {vkey!r} and {akey!r}; got {sorted(out)}")
        loss = gdt_loss(
            out[vkey], out[akey], self.hypothesis, temperature=self.temperature, valid=batch.get("has_audio")
        )
        return {"gdt": loss}

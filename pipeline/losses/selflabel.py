"""Self-labelling (SeLa, SeLaVi): multi-head cross-entropy against labels that Sinkhorn-Knopp assigns to the
whole dataset, re-solved on a schedule.

API for the training loop (every rank calls the same methods in the same order):

    sl = objective.selflabel                       # SelfLabelling, an nn.Module inside the Objective
    if sl.should_relabel(step, total_steps):
        for heads in sl.head_groups():             # one augmented pass over the dataset per group
            vlp, alp, idx = [], [], []
            for batch in exact_pass(dataset):      # each sample once across ranks; model in eval mode
                v, a = sl.relabel_inputs(model(batch))   # log-softmax (B, H, K) each (a is None without audio)
                vlp.append(v[:, heads]); alp.append(a[:, heads]); idx.append(batch["idx"])
            stats = sl.relabel(torch.cat(vlp), torch.cat(alp), torch.cat(idx), heads=heads)
            if "audio_perm" in stats:              # first labelling only
                model.set_audio_permutation(stats.pop("audio_perm"))

`relabel(video_logp (N_local, |heads|, K) or a list of (N_local, K) per head, audio_logp (same) or None,
idx (N_local,), *, heads=None, has_audio=None) -> dict` runs the distributed Sinkhorn-Knopp (each rank keeps its
rows; only K-sized vectors cross ranks, plus one K x K similarity at the first run for modality alignment), then
all-gathers the (idx, labels) pairs into the label table. The run counts as done once every head was labelled.

Modality alignment: at the first labelling, each head's audio clusters are matched to its video clusters; the
permutation is used for that labelling and returned as `stats["audio_perm"]` (H, K) long (heads not aligned yet
are the identity). The MODEL applies it from then on (SeLaVi permutes the audio head's rows), so exported
models and `eval.clustering.heads_argmax` see aligned audio logits; `model` above is the unwrapped MultiTower
(`engine.module` under DeepSpeed / DDP). Neither `forward` nor later labellings permute anything: they take
the model's (aligned) audio logits as they are.

State in buffers (checkpointed by `state_dict()`): `labels` (N, H) int64, `audio_perm` (H, K) (the alignment found
at the first labelling, kept as a record; the model's copy is the one applied), `sizes` (H, K)
drawn cluster sizes (Gaussian / Zipf, drawn once), `runs_done`, `heads_done` (H,).

Loss (SeLaVi): terms `selflabel/video` = mean over heads of CE(video logits, y) and `selflabel/audio` likewise
(samples with audio only); the Objective averages the two, giving 0.5 · video + 0.5 · audio.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from pipeline.distributed import all_gather_varlen, all_reduce_sum, global_mean, is_distributed
from pipeline.losses.sinkhorn import assign_marginals, draw_cluster_sizes, sinkhorn

log = logging.getLogger(__name__)
CHUNK_ROWS = 4096


@dataclass
class SelfLabelConfig:
    weight: float = 1.0
    heads: int = 1  # H heads, labelled independently
    clusters: int = 300  # K
    lam: float = 20.0  # SeLaVi 20 (on 0.5·(log p_v + log p_a)); SeLa 25
    marginals: Literal["uniform", "gaussian", "zipf"] = "uniform"
    marginal_param: float | None = None  # gaussian: sd (0.1); zipf: exponent (1.0); must be unset for uniform
    relabels: int = 100  # number of labelling runs over training (SeLaVi nopts)
    schedule_power: float = 1.5  # runs at total_steps · (j / relabels) ** power: denser early
    head_groups: int = 1  # heads split into groups, each labelled from its own augmented pass (SeLaVi ind_groups)
    bn_warmup_batches: int = 20  # training batches through the model in train mode before the first labelling
    align_modalities: bool = True  # permute audio clusters onto video clusters at the first labelling (SeLaVi MA)
    sk_max_iters: int = 2000
    sk_tol: float = 0.1
    sk_relax: float | None = None  # Sinkhorn-Knopp over-relaxation in [1, 2): 1 = SeLaVi's iterates; null = auto
    seed: int = 0  # initial labels, marginal draws, head grouping

    def __post_init__(self):
        if self.heads < 1 or self.clusters < 2:
            raise ValueError(f"selflabel needs heads >= 1 and clusters >= 2, got {self.heads} and {self.clusters}")
        if not 1 <= self.head_groups <= self.heads:
            raise ValueError(f"selflabel.head_groups must be in 1..heads={self.heads}, got {self.head_groups}")
        if self.lam <= 0 or self.relabels < 1 or self.schedule_power <= 0:
            raise ValueError(
                f"selflabel lam, relabels and schedule_power must be > 0, got {self.lam}, "
                f"{self.relabels}, {self.schedule_power}"
            )
        if self.bn_warmup_batches < 0:
            raise ValueError(f"selflabel.bn_warmup_batches must be >= 0, got {self.bn_warmup_batches}")
        if self.marginals == "uniform" and self.marginal_param is not None:
            raise ValueError(f"selflabel.marginal_param={self.marginal_param} does nothing with uniform marginals")
        if self.sk_relax is not None and not 1 <= self.sk_relax < 2:
            raise ValueError(f"selflabel.sk_relax must be in [1, 2) or null, got {self.sk_relax}")
        if self.marginal_param is not None and self.marginal_param <= 0:
            raise ValueError(f"selflabel.marginal_param must be > 0, got {self.marginal_param}")


class SelfLabelling(nn.Module):
    """SeLaVi self-labelling objective with its label table, schedule and Sinkhorn-Knopp re-labelling."""

    def __init__(self, cfg: SelfLabelConfig, *, num_samples: int):
        super().__init__()
        if num_samples < cfg.clusters:
            raise ValueError(f"self-labelling needs at least clusters={cfg.clusters} samples, got {num_samples}")
        self.cfg = cfg
        h, k = cfg.heads, cfg.clusters
        g = torch.Generator().manual_seed(cfg.seed)
        # SeLa starts from a random balanced labelling.
        labels = torch.stack([torch.randperm(num_samples, generator=g) % k for _ in range(h)], dim=1)  # (N, H)
        sizes = torch.stack(
            [draw_cluster_sizes(cfg.marginals, k, param=cfg.marginal_param, generator=g) for _ in range(h)]
        )  # (H, K)
        self.register_buffer("labels", labels)
        self.register_buffer("sizes", sizes)
        self.register_buffer("audio_perm", torch.arange(k).repeat(h, 1))
        self.register_buffer("runs_done", torch.zeros((), dtype=torch.int64))
        self.register_buffer("heads_done", torch.zeros(h, dtype=torch.bool))

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"selflabel/video": mean_h CE, "selflabel/audio": mean_h CE} against the labels of `batch["idx"]`."""
        if "video/logits" not in out:
            raise ValueError(f"self-labelling needs model output 'video/logits'; got {sorted(out)}")
        y = self._batch_labels(batch["idx"]).T  # (H, B)
        video = self._check_logits(out["video/logits"], "video/logits")
        h, b, k = video.shape
        terms = {
            "selflabel/video": global_mean(
                F.cross_entropy(video.reshape(h * b, k), y.reshape(-1), reduction="sum") / h, b
            )
        }
        if "audio/logits" in out:
            audio = self._check_logits(out["audio/logits"], "audio/logits")  # aligned by the model
            ce = F.cross_entropy(audio.reshape(h * b, k), y.reshape(-1), reduction="none").view(h, b).mean(0)
            has = batch.get("has_audio")
            has = torch.ones(b, dtype=torch.bool, device=ce.device) if has is None else has.bool()
            terms["selflabel/audio"] = global_mean(torch.where(has, ce, torch.zeros_like(ce)).sum(), has.sum())
        return terms

    def schedule(self, total_steps: int) -> list[int]:
        """Steps at which labelling runs start: total_steps · (j / R) ** power, j = 0..R-1, denser early (SeLaVi's
        schedule). Every one falls before the last step, so a run makes exactly R labelling runs."""
        r, p = self.cfg.relabels, self.cfg.schedule_power
        return [int(total_steps * (j / r) ** p) for j in range(r)]

    def should_relabel(self, step: int, total_steps: int) -> bool:
        """True when the next scheduled labelling run is due (the same answer on every rank)."""
        done = int(self.runs_done)
        plan = self.schedule(total_steps)
        return done < len(plan) and step >= plan[done]

    def head_groups(self) -> list[list[int]]:
        """This run's heads, shuffled and split into `head_groups` groups (each gets its own augmented pass)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 100003 + int(self.runs_done) + 1)
        order = torch.randperm(self.cfg.heads, generator=g).tolist()
        return [sorted(order[i :: self.cfg.head_groups]) for i in range(self.cfg.head_groups)]

    @staticmethod
    def relabel_inputs(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(video_logp, audio_logp) as (B, H, K) float32 log-softmax of the model's logits, as the model gives them."""
        video = F.log_softmax(out["video/logits"].detach().float(), dim=-1).transpose(0, 1)
        audio = out.get("audio/logits")
        if audio is not None:
            audio = F.log_softmax(audio.detach().float(), dim=-1).transpose(0, 1)
        return video, audio

    @torch.no_grad()
    def relabel(
        self,
        video_logp: torch.Tensor | Sequence[torch.Tensor],
        audio_logp: torch.Tensor | Sequence[torch.Tensor] | None,
        idx: torch.Tensor,
        *,
        heads: Sequence[int] | None = None,
        has_audio: torch.Tensor | None = None,
    ) -> dict[str, float | torch.Tensor]:
        """Solve SK for `heads` on this rank's rows (distributed across ranks), write the label table, return stats.

        At the first labelling the stats also hold "audio_perm" (H, K) int64: pass it to
        `MultiTower.set_audio_permutation` before the model's audio logits are used again.
        """
        start = time.perf_counter()
        heads = list(range(self.cfg.heads)) if heads is None else [int(h) for h in heads]
        video = _per_head(video_logp, len(heads), "video_logp")
        audio = None if audio_logp is None else _per_head(audio_logp, len(heads), "audio_logp")
        idx = idx.reshape(-1).to(torch.int64)
        self._check_rows(video, audio, idx, heads)
        has = None if audio is None else _as_mask(has_audio, idx.shape[0], video[0].device)
        first_run = int(self.runs_done) == 0 and self.cfg.align_modalities and audio is not None
        new, iters, errors, relax = [], [], [], []
        for j, h in enumerate(heads):
            perm = None
            if first_run:  # the model's audio logits are not aligned yet: align them for this labelling
                perm = _match_clusters(video[j], audio[j], has)
                self.audio_perm[h] = perm.to(self.audio_perm.device)
                perm = perm.to(video[j].device)
            scores = _combine(video[j], None if audio is None else audio[j], perm, has)  # (N_local, K) float32
            target = None
            if self.cfg.marginals != "uniform":
                target = assign_marginals(self.sizes[h].cpu(), _soft_mass(scores)).to(scores.device)
            res = sinkhorn(
                scores,
                self.cfg.lam,
                target,
                max_iters=self.cfg.sk_max_iters,
                tol=self.cfg.sk_tol,
                relax=self.cfg.sk_relax,
                distributed=True,
                inplace=True,
            )
            del scores
            new.append(res.labels)
            iters.append(res.iterations)
            errors.append(res.error)
            relax.append(res.relax)
        stats: dict[str, float | torch.Tensor] = self._write_labels(idx, torch.stack(new, dim=1), heads)
        self.heads_done[heads] = True
        if bool(self.heads_done.all()):
            self.runs_done += 1
            self.heads_done.zero_()
        stats.update(
            {
                "run": float(self.runs_done),
                "sk_iterations": float(max(iters)),
                "sk_error": float(max(errors)),
                "sk_relax": float(max(relax)),  # over-relaxation factor of the last SK iteration (1: plain)
                "seconds": time.perf_counter() - start,
            }
        )
        log.info("self-labelling heads %s: %s", heads, {k: round(v, 4) for k, v in stats.items()})
        if first_run:
            stats["audio_perm"] = self.audio_perm.clone()  # (H, K) for MultiTower.set_audio_permutation
        return stats

    def _write_labels(self, idx, labels, heads) -> dict[str, float]:
        idx_all = all_gather_varlen(idx.to(self.labels.device))  # (N_seen,)
        lab_all = all_gather_varlen(labels.to(self.labels.device))  # (N_seen, |heads|)
        cols = torch.tensor(heads, device=self.labels.device)
        old = self.labels[idx_all[:, None], cols[None, :]]
        self.labels[idx_all[:, None], cols[None, :]] = lab_all
        k = self.cfg.clusters
        counts = torch.stack([torch.bincount(lab_all[:, j], minlength=k) for j in range(len(heads))])  # (|h|, K)
        seen = torch.unique(idx_all).numel()
        if seen < self.labels.shape[0]:
            log.warning(
                "self-labelling saw %d of %d samples; the others keep their previous labels", seen, self.labels.shape[0]
            )
        return {
            "samples": float(seen),
            "coverage": seen / self.labels.shape[0],
            "changed": float((old != lab_all).float().mean()) if lab_all.numel() else 0.0,
            "clusters_used_min": float((counts > 0).sum(1).min()),
            "largest_cluster_frac": float(counts.max()) / max(1, idx_all.numel()),
        }

    def _batch_labels(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.labels.shape[0]):
            raise ValueError(
                f"batch idx out of range [0, {self.labels.shape[0]}): min {int(idx.min())}, max {int(idx.max())}"
            )
        return self.labels[idx]  # (B, H)

    def _check_logits(self, logits: torch.Tensor, name: str) -> torch.Tensor:
        if logits.dim() != 3 or logits.shape[0] != self.cfg.heads or logits.shape[2] != self.cfg.clusters:
            raise ValueError(
                f"{name} must be (H={self.cfg.heads}, B, K={self.cfg.clusters}), got {tuple(logits.shape)}"
            )
        return logits

    def _check_rows(self, video, audio, idx, heads) -> None:
        n, k = idx.shape[0], self.cfg.clusters
        if len(set(heads)) != len(heads) or any(not 0 <= h < self.cfg.heads for h in heads):
            raise ValueError(f"heads must be distinct indices in 0..{self.cfg.heads - 1}, got {heads}")
        for name, mats in (("video_logp", video), ("audio_logp", audio or [])):
            for m in mats:
                if tuple(m.shape) != (n, k):
                    raise ValueError(f"{name} per head must be (N_local={n}, K={k}), got {tuple(m.shape)}")
        if n and (int(idx.min()) < 0 or int(idx.max()) >= self.labels.shape[0]):
            raise ValueError(
                f"idx out of range [0, {self.labels.shape[0]}): min {int(idx.min())}, max {int(idx.max())}"
            )


def _per_head(x, count: int, name: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 3 or x.shape[1] != count:
            raise ValueError(f"{name} must be (N_local, {count} heads, K), got {tuple(x.shape)}")
        return [x[:, j] for j in range(count)]
    if len(x) != count:
        raise ValueError(f"{name} must hold {count} per-head tensors, got {len(x)}")
    return list(x)


def _as_mask(has_audio, n: int, device) -> torch.Tensor:
    if has_audio is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if has_audio.shape != (n,):
        raise ValueError(f"has_audio must be ({n},), got {tuple(has_audio.shape)}")
    return has_audio.to(device=device, dtype=torch.bool)


def _combine(video, audio, perm, has) -> torch.Tensor:
    """SeLaVi scores 0.5 · (log p_v + log p_a[:, perm]) (video alone where audio is missing), in a new fp32 buffer.

    `perm` None: the audio columns are already aligned (by the model)."""
    scores = torch.empty(video.shape, dtype=torch.float32, device=video.device)
    for s in range(0, video.shape[0], CHUNK_ROWS):
        rows = scores[s : s + CHUNK_ROWS]
        rows.copy_(video[s : s + CHUNK_ROWS])
        if audio is not None:
            a = audio[s : s + CHUNK_ROWS].float()
            a = a if perm is None else a[:, perm]  # (c, K) aligned to the video clusters
            rows.copy_(torch.where(has[s : s + CHUNK_ROWS, None], 0.5 * (rows + a), rows))
    return scores


def _soft_mass(scores: torch.Tensor) -> torch.Tensor:
    """Current cluster mass Σ_n softmax(scores[n]) (K,), summed over ranks; ranks clusters for the marginals."""
    mass = torch.zeros(scores.shape[1], dtype=torch.float64, device=scores.device)
    for s in range(0, scores.shape[0], CHUNK_ROWS):
        mass += torch.softmax(scores[s : s + CHUNK_ROWS], dim=1).sum(0, dtype=torch.float64)
    return (all_reduce_sum(mass) if is_distributed() else mass).cpu()


def _match_clusters(video, audio, has) -> torch.Tensor:
    """Permutation perm (K,) so that audio cluster perm[k] matches video cluster k (SeLaVi modality alignment).

    SeLaVi minimises Σ_k |P_v[:, k] - P_a[:, perm k]|_1 by random swaps; here the assignment that maximises
    Σ_k <P_v[:, k], P_a[:, perm k]> is solved exactly (Hungarian) on the K x K similarity summed over ranks.
    """
    k = video.shape[1]
    sim = torch.zeros(k, k, dtype=torch.float64, device=video.device)
    for s in range(0, video.shape[0], CHUNK_ROWS):
        keep = has[s : s + CHUNK_ROWS]
        pv = video[s : s + CHUNK_ROWS][keep].double().exp()
        pa = audio[s : s + CHUNK_ROWS][keep].double().exp()
        sim += pv.T @ pa  # (K, K)
    sim = all_reduce_sum(sim) if is_distributed() else sim
    _, cols = linear_sum_assignment(sim.cpu().numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.int64)

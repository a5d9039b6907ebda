"""Objectives: config sections, and `build_objective` that combines MIL-NCE, GDT and self-labelling by weight.

    objective = build_objective(cfg.loss, num_samples=dataset_samples).to(device)
    total, terms = objective(out, batch)      # total = Σ weight · (mean of that objective's terms)

Each objective returns named, unweighted terms (`{"milnce"}`, `{"gdt"}`, `{"selflabel/video",
"selflabel/audio"}`); an objective's value is the mean of its terms, so self-labelling gives SeLaVi's
0.5 CE(video) + 0.5 CE(audio). See docs/objectives.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pipeline.losses.gdt import GDT, hypothesis_terms
from pipeline.losses.milnce import MilNCE, milnce_loss
from pipeline.losses.selflabel import SelfLabelling
from pipeline.losses.sinkhorn import sinkhorn_knopp

__all__ = [
    "LossConfig",
    "MilNCEConfig",
    "GDTConfig",
    "SelfLabelConfig",
    "Objective",
    "build_objective",
    "milnce_loss",
    "sinkhorn_knopp",
    "SelfLabelling",
]


@dataclass
class MilNCEConfig:
    weight: float = 1.0
    space: str = "vt"  # reads out["video@vt"], out["text@vt"]
    temperature: float | None = None  # None = the official formula (no temperature)

    def __post_init__(self):
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"milnce.temperature must be > 0, got {self.temperature}")


@dataclass
class GDTConfig:
    weight: float = 1.0
    space: str = "va"
    hypothesis: int = 1  # 1-9, see pipeline/losses/gdt.py
    temperature: float = 0.07

    def __post_init__(self):
        hypothesis_terms(self.hypothesis)
        if self.temperature <= 0:
            raise ValueError(f"gdt.temperature must be > 0, got {self.temperature}")


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


@dataclass
class LossConfig:
    milnce: MilNCEConfig | None = None
    gdt: GDTConfig | None = None
    selflabel: SelfLabelConfig | None = None


class Objective(nn.Module):
    """Weighted sum of the configured objectives; self-label state lives in its buffers (`state_dict()`)."""

    def __init__(self, losses: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        self.losses = nn.ModuleDict(losses)
        self.weights = dict(weights)

    @property
    def selflabel(self) -> SelfLabelling | None:
        """The self-labelling objective (for `should_relabel` / `relabel`), or None."""
        return self.losses["selflabel"] if "selflabel" in self.losses else None

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
        """(total, terms): total = Σ weight · mean(terms of that objective); terms are unweighted, for logging."""
        total, terms = None, {}
        for name, loss in self.losses.items():
            parts = loss(out, batch)
            value = sum(parts.values()) / len(parts) * self.weights[name]
            total = value if total is None else total + value
            terms.update(parts)
        return total, terms


def build_objective(cfg: LossConfig, *, num_samples: int) -> Objective:
    """The objectives named in `cfg`; `num_samples` sizes the self-label table (dataset `idx` range)."""
    losses, weights = {}, {}
    if cfg.milnce is not None:
        losses["milnce"] = MilNCE(cfg.milnce.space, cfg.milnce.temperature)
        weights["milnce"] = cfg.milnce.weight
    if cfg.gdt is not None:
        losses["gdt"] = GDT(cfg.gdt.hypothesis, cfg.gdt.space, cfg.gdt.temperature)
        weights["gdt"] = cfg.gdt.weight
    if cfg.selflabel is not None:
        losses["selflabel"] = SelfLabelling(cfg.selflabel, num_samples=num_samples)
        weights["selflabel"] = cfg.selflabel.weight
    if not losses:
        raise ValueError("loss config names no objective: set at least one of milnce, gdt, selflabel")
    return Objective(losses, weights)

"""Objectives: config sections, and `build_objective` that combines MIL-NCE, GDT and self-labelling by weight.

    objective = build_objective(cfg.loss, num_samples=dataset_samples).to(device)
    total, terms = objective(out, batch)      # total = Σ weight · (mean of that objective's terms)

Each objective returns named, unweighted terms (`{"milnce"}`, `{"gdt"}`, `{"selflabel/video",
"selflabel/audio"}`); an objective's value is the mean of its terms, so self-labelling gives SeLaVi's
0.5 CE(video) + 0.5 CE(audio). See docs/objectives.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.losses.gdt import GDT, hypothesis_terms
from pipeline.losses.milnce import MilNCE, milnce_loss
from pipeline.losses.selflabel import SelfLabelConfig, SelfLabelling
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

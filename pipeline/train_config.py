"""Typed configuration of a training run: `TrainConfig` composes each component's own config.

A recipe (launch/configs/*.yaml) is one mapping with the sections below; `load_train_config` builds
and checks it. Every knob is documented in docs/training.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from models.towers import ModelConfig
from pipeline.config import ConfigError, apply_overrides, from_dict, load_yaml
from pipeline.data_config import DataConfig
from pipeline.losses import LossConfig


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Where the run lives, how long it is, and how it is batched and checkpointed."""

    name: str
    steps: int  # optimizer steps (not micro-batches)
    batch_size: int  # global clips per optimizer step = per-rank micro-batch x ranks x grad_accum
    runs_dir: str = "runs"
    grad_accum: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 1000
    keep_ckpts: int = 3
    max_nonfinite: int = 10  # consecutive non-finite losses before the run stops
    tensorboard: bool = True
    trace_samples: bool = False  # write <run>/trace/rank<r>.jsonl: sample ids per step + final weight checksum
    threads: int | None = None  # torch threads per rank; None: this rank's share of the cores minus its loader workers

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"run.name must be a plain directory name, got {self.name!r}")
        for key in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "keep_ckpts", "max_nonfinite"):
            if getattr(self, key) < 1:
                raise ValueError(f"run.{key} must be >= 1, got {getattr(self, key)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"run.threads must be >= 1 (or null for the default), got {self.threads}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"run.zero_stage must be 0, 1 or 2 (stage 3 is not supported), got {self.zero_stage}")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """The optimiser (AdamW by default; Adam as MIL-NCE, SGD with momentum as GDT and SeLaVi) with linear warmup
    and a cosine decay to `final_lr_ratio` (1.0: constant after the warm-up, as GDT and SeLaVi); every value is
    passed to DeepSpeed explicitly."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-5  # not applied to biases and norm parameters
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw
    eps: float = 1e-8  # adam, adamw
    momentum: float = 0.9  # sgd (Nesterov off)
    warmup_steps: int = 0
    final_lr_ratio: float = 0.0  # lr at the last step, relative to `lr`
    clip_grad_norm: float = 0.0  # 0 = off (DeepSpeed 0.19 would otherwise clip at 1.0)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0 or self.clip_grad_norm < 0 or self.weight_decay < 0:
            raise ValueError("optim.warmup_steps, optim.clip_grad_norm and optim.weight_decay must be >= 0")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ValueError(f"optim.final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"optim.momentum must be in [0, 1), got {self.momentum}")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """The periodic evaluation hook: held-out retrieval every `every` steps (0 = off)."""

    every: int = 0
    dataset: str = ""  # a built dataset directory (usually the test split)
    max_samples: int = 512  # embed the first shards holding at least this many videos (0: the whole dataset)

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"eval.every must be >= 0, got {self.every}")
        if self.max_samples < 0:
            raise ValueError(f"eval.max_samples must be >= 0 (0 = all), got {self.max_samples}")
        if self.every and not self.dataset:
            raise ValueError("eval.every is set but eval.dataset is empty: name the held-out dataset directory")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A whole recipe: one section per component."""

    run: RunConfig
    model: ModelConfig
    data: DataConfig
    loss: LossConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a recipe, apply `a.b=value` overrides, and validate it into a `TrainConfig`."""
    return train_config_from_dict(apply_overrides(load_yaml(path), list(overrides)), where=str(path))


# Data settings that a recipe sets elsewhere (each fact has one home): the key under `data`, and where it is set.
DERIVED_DATA_KEYS = {
    "batch_size": "run.batch_size (global)",
    "num_frames": "model.num_frames",
    "size": "model.size",
    "fps": "model.fps",
    "mean": "the video encoder's input contract",
    "std": "the video encoder's input contract",
    "audio.sample_rate": "model.sample_rate",
    "audio.num_mel_bins": "model.num_mel_bins",
    "audio.seconds": "model.audio_seconds",
    "audio.win_ms": "the audio encoder's input contract",
    "audio.hop_ms": "the audio encoder's input contract",
    "text.max_tokens": "model.max_tokens",
}


def train_config_from_dict(data: dict, *, where: str = "config") -> TrainConfig:
    """Validate plain data into a `TrainConfig`; errors name the file and the key.

    Facts with a home elsewhere are refused in the data and loss sections: clip, audio and text settings belong
    to the model (`DERIVED_DATA_KEYS`), which modalities are loaded follows the model's towers, and the
    self-label heads and clusters are `model.selflabel_heads/clusters`. A saved run's config.yaml, which
    records the derived values, loads back as long as they agree with their home.
    """
    data = _derive(dict(data), where)
    try:
        return from_dict(TrainConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _derive(cfg: dict, where: str) -> dict:
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    towers = {"video": model.get("video", "set"), "audio": model.get("audio"), "text": model.get("text")}
    section = cfg.get("data")
    if isinstance(section, dict):
        section = {k: dict(v) if isinstance(v, dict) else v for k, v in section.items()}
        for key, home in DERIVED_DATA_KEYS.items():
            parent, _, leaf = key.rpartition(".")
            holder = section.get(parent, {}) if parent else section
            if isinstance(holder, dict) and (holder.get(leaf) is not None or key == "batch_size" and leaf in holder):
                raise ConfigError(f"{where}: data.{key} is derived from {home}; set that instead")
        for modality in ("audio", "text"):
            sub = section.setdefault(modality, {})
            has_tower = towers[modality] is not None
            if isinstance(sub, dict):
                if "enabled" in sub and bool(sub["enabled"]) != has_tower:
                    raise ConfigError(
                        f"{where}: data.{modality}.enabled={sub['enabled']} but the model has "
                        f"{'a' if has_tower else 'no'} {modality} tower: the loader reads the modalities of the "
                        f"model's towers (model.{modality})"
                    )
                sub["enabled"] = has_tower
        cfg["data"] = section
    loss = cfg.get("loss")
    if isinstance(loss, dict) and isinstance(loss.get("selflabel"), dict):
        sl = dict(loss["selflabel"])
        if not model.get("selflabel_heads"):
            raise ConfigError(f"{where}: loss.selflabel needs self-label heads: set model.selflabel_heads/clusters")
        for key, home in (("heads", "selflabel_heads"), ("clusters", "selflabel_clusters")):
            if key in sl and sl[key] != model.get(home):
                raise ConfigError(
                    f"{where}: loss.selflabel.{key}={sl[key]} disagrees with model.{home}={model.get(home)}: the "
                    f"heads and clusters are set once, as model.{home}"
                )
            if model.get(home):
                sl[key] = model[home]
        cfg["loss"] = {**loss, "selflabel": sl}
    return cfg

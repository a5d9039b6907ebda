"""The multi-tower model: video / audio / text encoders, projections into named shared spaces, self-label heads.

`MultiTower.forward(batch) -> dict` eats DESIGN.md's batch dict (on the model's device: the loader hands it over
there) and returns DESIGN.md's model dict:
`"<m>/feat"` (backbone vectors), `"<m>@<space>"` (embeddings), `"video/logits"` / `"audio/logits"` (H, B, K).
Views (video/audio) and captions (text) keep their axis: `(B, V, D)` / `(B, K, D)`. Any tower may be absent; a
missing input gives missing outputs. The model never calls backward and never moves itself between devices.

Spaces: each `SpaceConfig` gives a modality its own head into the space, except MMV's fine-and-coarse (FAC) case:
a space with `source="va"` reaches modalities that are also in "va" through ONE shared head applied to
ReLU(their un-normalised "va" embedding) (MMV's `fac_relu`); the others (text) get their own head from features.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.contracts import PAD_ID, AudioInput, TextInput, VideoInput, normalize_video
from models.heads import SelfLabelHeads, make_projection
from models.variants import VARIANTS, build_encoder, variant_contract

log = logging.getLogger(__name__)

MODALITIES = ("video", "audio", "text")


@dataclass
class SpaceConfig:
    """One named shared embedding space."""

    name: str  # e.g. "va", "vt"
    modalities: list[str]  # subset of MODALITIES
    dim: int = 256
    head: str = "mlp"  # "mlp" (GDT style) | "linear"
    normalize: bool = True  # L2-normalise outputs
    source: str | None = None  # MMV FAC: reach this space from the fine space `source` through ReLU + a shared head
    hidden: int = 512  # MLP hidden width (GDT: 512)
    dropout: float = 0.3  # MLP dropout (GDT: 0.3); unused by "linear"

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"space name {self.name!r} must be an identifier (it becomes part of output keys)")
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or not self.modalities:
            raise ValueError(
                f"space {self.name!r}: modalities {self.modalities} must be a non-empty subset of {list(MODALITIES)}"
            )
        if self.head not in ("mlp", "linear"):
            raise ValueError(f"space {self.name!r}: head {self.head!r} is not 'mlp' or 'linear'")
        if self.dim < 1 or self.hidden < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"space {self.name!r}: bad dim={self.dim} / hidden={self.hidden} / dropout={self.dropout}")


def _default_spaces() -> list[SpaceConfig]:
    # MIL-NCE as released: one video-text space, a linear map to 512-d, plain dot product (no L2).
    return [SpaceConfig("vt", ["video", "text"], dim=512, head="linear", normalize=False)]


@dataclass
class ModelConfig:
    """Which encoders, which spaces, which self-label heads; optional overrides of the encoders' input contracts."""

    video: str | None = "s3d_tiny"  # VARIANTS name or None
    audio: str | None = None
    text: str | None = None
    spaces: list[SpaceConfig] = field(default_factory=_default_spaces)
    selflabel_heads: int = 0  # H (0: none)
    selflabel_clusters: int = 0  # K
    vocab_size: int | None = None  # text vocab (from the tokenizer; None -> variant default)
    max_tokens: int | None = None
    freeze_text_embeddings: bool = False
    num_frames: int | None = None  # video contract overrides (None -> variant default)
    size: int | None = None
    fps: float | None = None
    sample_rate: int | None = None  # audio contract overrides
    num_mel_bins: int | None = None
    audio_seconds: float | None = None

    def __post_init__(self):
        for modality in MODALITIES:
            name = getattr(self, modality)
            if name is None:
                continue
            if name not in VARIANTS:
                raise ValueError(f"model.{modality}: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
            if VARIANTS[name].modality != modality:
                raise ValueError(f"model.{modality}: {name!r} is a {VARIANTS[name].modality} encoder")
        self.spaces = [s if isinstance(s, SpaceConfig) else SpaceConfig(**s) for s in self.spaces]
        seen: list[str] = []
        for space in self.spaces:
            if space.name in seen:
                raise ValueError(f"model.spaces: space {space.name!r} is defined twice")
            if space.source is not None and space.source not in seen:
                raise ValueError(
                    f"model.spaces: {space.name!r} has source {space.source!r}, which must be a space "
                    f"listed before it (defined: {seen})"
                )
            seen.append(space.name)
        if (self.selflabel_heads > 0) != (self.selflabel_clusters > 0):
            raise ValueError(
                f"model: selflabel_heads={self.selflabel_heads} and selflabel_clusters="
                f"{self.selflabel_clusters} must both be 0 or both be positive"
            )

    def contracts(self) -> dict[str, VideoInput | AudioInput | TextInput]:
        """Input contracts of the configured towers, with this config's overrides applied."""
        out = {}
        if self.video:
            out["video"] = variant_contract(self.video, num_frames=self.num_frames, size=self.size, fps=self.fps)
        if self.audio:
            out["audio"] = variant_contract(
                self.audio, sample_rate=self.sample_rate, num_mel_bins=self.num_mel_bins, seconds=self.audio_seconds
            )
        if self.text:
            out["text"] = variant_contract(self.text, vocab_size=self.vocab_size, max_tokens=self.max_tokens)
        return out


class MultiTower(nn.Module):
    """Encoders + space heads + self-label heads; see the module docstring for the output dict."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.spaces = list(cfg.spaces)
        self.encoders = nn.ModuleDict()
        for modality, contract in cfg.contracts().items():
            freeze = cfg.freeze_text_embeddings if modality == "text" else False
            self.encoders[modality] = build_encoder(getattr(cfg, modality), contract=contract, freeze_embeddings=freeze)
        self.heads = nn.ModuleDict({s.name: self._space_heads(s) for s in self.spaces})
        self.selflabel = nn.ModuleDict()
        if cfg.selflabel_heads:
            for modality in ("video", "audio"):
                if modality in self.encoders:
                    dim = self.encoders[modality].feature_dim
                    self.selflabel[modality] = SelfLabelHeads(dim, cfg.selflabel_heads, cfg.selflabel_clusters)
            if not self.selflabel:
                raise ValueError("self-label heads need a video or an audio tower")

    def _space_heads(self, space: SpaceConfig) -> nn.ModuleDict:
        heads = nn.ModuleDict()
        source = next((s for s in self.spaces if s.name == space.source), None)
        for modality in space.modalities:
            if modality not in self.encoders:
                continue
            if source is not None and modality in source.modalities:
                key, in_dim = f"from_{source.name}", source.dim
            else:
                key, in_dim = modality, self.encoders[modality].feature_dim
            if key not in heads:
                heads[key] = make_projection(space.head, in_dim, space.dim, hidden=space.hidden, dropout=space.dropout)
        return heads

    def set_audio_permutation(self, perm: Tensor) -> None:
        """Align the audio self-label clusters with the video ones: `"audio/logits"[h, :, k]` becomes the audio
        head's cluster `perm[h, k]` (H, K). Call with `SelfLabelling.relabel(...)["audio_perm"]` after the first
        labelling; the permutation is a buffer, so checkpoints and exports keep it."""
        if "audio" not in self.selflabel:
            raise ValueError("set_audio_permutation: this model has no audio self-label heads")
        self.selflabel["audio"].set_permutation(perm)

    @property
    def dot_product_spaces(self) -> tuple[str, ...]:
        """Spaces declared `normalize: false`: compared by the dot product (evaluation stores them un-normalised)."""
        return tuple(s.name for s in self.spaces if not s.normalize)

    def input_contracts(self) -> dict[str, VideoInput | AudioInput | TextInput]:
        """Contracts of the present towers only."""
        return {m: enc.input_contract for m, enc in self.encoders.items()}

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        feats: dict[str, Tensor] = {}  # modality -> (N, F), N = B*V or B*K
        lead: dict[str, tuple[int, int]] = {}  # modality -> (B, V or K)
        if "video" in batch and "video" in self.encoders:
            video = batch["video"]  # (B, V, 3, T, S, S) at the model's size: uint8 pixels, or float normalised
            lead["video"] = tuple(video.shape[:2])
            x = video.flatten(0, 1)  # (B*V, C, T, H, W)
            if x.dtype == torch.uint8:
                contract = self.encoders["video"].input_contract
                x = normalize_video(x, contract.mean, contract.std)
            feats["video"] = self.encoders["video"].forward_features(x)
        if "audio" in batch and "audio" in self.encoders:
            audio = batch["audio"]  # (B, V, 1, F, Ta)
            lead["audio"] = tuple(audio.shape[:2])
            feats["audio"] = self.encoders["audio"].forward_features(audio.flatten(0, 1).float())
        if "text" in batch and "text" in self.encoders:
            ids = batch["text"]  # (B, K, L)
            mask = batch.get("text_mask")
            mask = ids != PAD_ID if mask is None else mask
            lead["text"] = tuple(ids.shape[:2])
            feats["text"] = self.encoders["text"].forward_features(ids.flatten(0, 1), mask.flatten(0, 1))

        out = {f"{m}/feat": f.view(*lead[m], -1) for m, f in feats.items()}
        raw: dict[tuple[str, str], Tensor] = {}  # (space, modality) -> un-normalised (N, D), read by FAC spaces
        for space in self.spaces:
            heads = self.heads[space.name]
            for modality in space.modalities:
                if modality not in feats:
                    continue
                if (space.source, modality) in raw:
                    z = heads[f"from_{space.source}"](F.relu(raw[(space.source, modality)]))
                else:
                    z = heads[modality](feats[modality])
                raw[(space.name, modality)] = z
                z = F.normalize(z, dim=-1) if space.normalize else z
                out[f"{modality}@{space.name}"] = z.view(*lead[modality], -1)
        for modality, heads in self.selflabel.items():
            if modality in feats:
                view0 = feats[modality].view(*lead[modality], -1)[:, 0]  # (B, F): labels describe the base view
                out[f"{modality}/logits"] = heads(view0)  # (H, B, K)
        return out


def build_model(cfg: ModelConfig) -> MultiTower:
    """The multi-tower model for `cfg` (freshly initialised, in training mode)."""
    model = MultiTower(cfg)
    log.info(
        "model: %s; spaces %s; %.2fM parameters",
        ", ".join(f"{m}={getattr(cfg, m)}" for m in model.encoders),
        [s.name for s in cfg.spaces],
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return model


def model_config_from_dict(data: dict) -> ModelConfig:
    """`ModelConfig` from plain data (a `model.yaml`); unknown keys are errors that name the key."""
    if not isinstance(data, dict):
        raise ValueError(f"model config must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"model config: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    data = dict(data)
    if "spaces" in data:
        space_keys = {f.name for f in dataclasses.fields(SpaceConfig)}
        for i, space in enumerate(data["spaces"]):
            bad = sorted(set(space) - space_keys) if isinstance(space, dict) else ["<not a mapping>"]
            if bad:
                raise ValueError(f"model config: spaces[{i}]: unknown key {bad[0]!r}")
        data["spaces"] = [SpaceConfig(**s) for s in data["spaces"]]
    return ModelConfig(**data)


def save_exported(model: MultiTower, cfg: ModelConfig, out_dir: str | Path) -> None:
    """Write `out_dir/model.safetensors` (fp32 weights and BN buffers) and `out_dir/model.yaml` (the config)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    tmp = out_dir / "model.safetensors.tmp"
    # One metadata entry: safetensors writes the map in hash order, so two entries would make two exports of the
    # same weights differ in bytes (and in the content fingerprint embeddings are keyed by).
    save_file(tensors, str(tmp), metadata={"vatp-model": "1"})
    os.replace(tmp, out_dir / "model.safetensors")
    with open(out_dir / "model.yaml.tmp", "w", encoding="utf-8") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    os.replace(out_dir / "model.yaml.tmp", out_dir / "model.yaml")


def load_exported(path: str | Path) -> tuple[MultiTower, ModelConfig]:
    """Rebuild an exported model (directory with model.safetensors + model.yaml), in eval mode on the CPU."""
    path = Path(path)
    out_dir = path.parent if path.is_file() else path
    weights, config = out_dir / "model.safetensors", out_dir / "model.yaml"
    for p in (weights, config):
        if not p.is_file():
            raise ValueError(f"exported model incomplete: {p} not found")
    try:
        with open(config, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{config} is not valid YAML: {e}") from e
    cfg = model_config_from_dict(data)
    model = MultiTower(cfg)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights} is not a readable safetensors file: {e}") from e
    # Exports written before self-label heads had a cluster permutation lack it: the identity is what they meant.
    for key, value in model.state_dict().items():
        if key.startswith("selflabel.") and key.endswith(".perm") and key not in state:
            state[key] = value
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights} does not match {config}: {e}") from e
    return model.eval(), cfg

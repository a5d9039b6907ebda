"""The named encoder variants: `VARIANTS` (modality, default input contract, builder), `build_encoder`,
`variant_contract`. Re-exported by the `models` package; see its docstring."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

from models.audio import AudioResNet
from models.contracts import AudioInput, TextInput, VideoInput
from models.r2plus1d import R2Plus1D
from models.s3d import S3D
from models.text import MilNCEText, TransformerText

Contract = VideoInput | AudioInput | TextInput

# GDT's R(2+1)D normalisation (Kinetics statistics); S3D eats plain [0, 1] RGB.
_GDT_MEAN, _GDT_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)


@dataclass(frozen=True)
class Variant:
    """A named encoder: its modality, default input contract, and `build(contract, embed_dim, **kw) -> nn.Module`."""

    modality: str
    contract: Contract
    build: Callable[..., nn.Module]


def _conv(cls: Callable[..., nn.Module], **arch) -> Callable[..., nn.Module]:
    """Builder for video/audio CNNs: their architecture does not depend on the contract."""

    def build(contract: VideoInput | AudioInput, embed_dim: int | None) -> nn.Module:
        return cls(**arch, embed_dim=embed_dim)

    return build


def _text(cls: type, **arch) -> Callable[..., nn.Module]:
    """Builder for text towers: the vocabulary (and a Transformer's positions) come from the contract."""

    def build(contract: TextInput, embed_dim: int | None, freeze_embeddings: bool = False) -> nn.Module:
        extra = {"max_tokens": contract.max_tokens} if cls is TransformerText else {}
        return cls(contract.vocab_size, **arch, **extra, embed_dim=embed_dim, freeze_embeddings=freeze_embeddings)

    return build


_AUDIO_GDT = AudioInput(sample_rate=16000, num_mel_bins=40, seconds=1.0, win_length_ms=20.0, hop_length_ms=10.0)

VARIANTS: dict[str, Variant] = {
    # video
    "s3d": Variant("video", VideoInput(32, 224, 10.0), _conv(partial(S3D, space_to_depth=True))),
    "s3d_tiny": Variant("video", VideoInput(8, 64, 10.0), _conv(partial(S3D, space_to_depth=True), width=0.125)),
    "r2plus1d_18": Variant(
        "video", VideoInput(30, 112, 30.0, _GDT_MEAN, _GDT_STD), _conv(R2Plus1D, layers=(2, 2, 2, 2))
    ),
    "r2plus1d_tiny": Variant(
        "video", VideoInput(8, 64, 10.0, _GDT_MEAN, _GDT_STD), _conv(R2Plus1D, layers=(1, 1, 1, 1), width=0.125)
    ),
    # audio
    "audio_resnet9": Variant("audio", _AUDIO_GDT, _conv(AudioResNet, layers=(1, 1, 1, 1))),
    "audio_resnet18": Variant("audio", _AUDIO_GDT, _conv(AudioResNet, layers=(2, 2, 2, 2))),
    "audio_tiny": Variant("audio", AudioInput(16000, 40, 1.0), _conv(AudioResNet, layers=(1, 1, 1, 1), width=0.125)),
    # text
    "text_milnce": Variant("text", TextInput(20, 8000), _text(MilNCEText, word_dim=300, hidden=2048)),
    "text_transformer": Variant("text", TextInput(32, 8000), _text(TransformerText, d_model=256, layers=4, heads=4)),
    "text_tiny": Variant("text", TextInput(16, 1000), _text(MilNCEText, word_dim=32, hidden=64)),
    "text_transformer_tiny": Variant(
        "text", TextInput(16, 1000), _text(TransformerText, d_model=32, layers=1, heads=2)
    ),
}


def build_encoder(
    name: str,
    *,
    contract: Contract | None = None,
    embed_dim: int | None = None,
    freeze_embeddings: bool = False,
) -> nn.Module:
    """Build variant `name`; the module gets `.input_contract`, `.feature_dim`, `.embed_dim`, `forward_features`.

    `contract` replaces the variant's default (text towers take their vocabulary and, for the Transformer, the
    number of positions from it). `embed_dim` adds the tower's own final Linear (S3D's `fc`, MIL-NCE's `fc2`);
    None leaves projection to the multi-tower heads. `freeze_embeddings` freezes a text tower's word embeddings.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown encoder variant {name!r} (known: {', '.join(VARIANTS)})")
    variant = VARIANTS[name]
    contract = contract or variant.contract
    if type(contract) is not type(variant.contract):
        raise ValueError(f"{name} is a {variant.modality} encoder; got a {type(contract).__name__} contract")
    if variant.modality == "text":
        encoder = variant.build(contract, embed_dim, freeze_embeddings=freeze_embeddings)
    elif freeze_embeddings:
        raise ValueError(f"freeze_embeddings applies to text encoders only, not {name!r}")
    else:
        encoder = variant.build(contract, embed_dim)
    encoder.input_contract = contract
    return encoder


def variant_contract(name: str, **overrides) -> Contract:
    """Variant `name`'s contract with fields replaced by the non-None `overrides` (e.g. `num_frames=16`)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown encoder variant {name!r} (known: {', '.join(VARIANTS)})")
    contract = VARIANTS[name].contract
    fields = {f.name for f in dataclasses.fields(contract)}
    changes = {k: v for k, v in overrides.items() if v is not None}
    for key in changes:
        if key not in fields:
            raise ValueError(f"{name}: {key!r} is not a field of {type(contract).__name__}")
    return dataclasses.replace(contract, **changes)

"""Input contracts: what each encoder expects, declared once so data code reads it instead of repeating it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the contracts import without torch: data preparation reads them (and PAD_ID) too
    import torch


@dataclass(frozen=True)
class VideoInput:
    """A video tower eats `num_frames` RGB frames of `size` x `size` sampled at `fps`.

    The model's input is `(x / 255 - mean) / std` of RGB pixels x in [0, 255] (mean 0 / std 1 means "RGB in
    [0, 1]", as the released S3D-G expects): `normalize_video`. The multi-tower model applies it to uint8
    frames itself; the loader's batched augmentation step applies it on the device and hands over floats.
    """

    num_frames: int
    size: int
    fps: float
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def seconds(self) -> float:
        return self.num_frames / self.fps


@dataclass(frozen=True)
class AudioInput:
    """An audio tower eats a log-mel spectrogram `(1, num_mel_bins, frames)` of `seconds` of mono audio."""

    sample_rate: int
    num_mel_bins: int
    seconds: float
    win_length_ms: float = 25.0
    hop_length_ms: float = 10.0

    @property
    def num_frames(self) -> int:
        """Spectrogram frames for `seconds` of audio (centred STFT: one frame per hop, plus one); the loader's
        `pipeline.data_config.mel_frames` reads it."""
        hop = round(self.sample_rate * self.hop_length_ms / 1000)
        return round(self.seconds * self.sample_rate) // hop + 1


PAD_ID = 0  # the token id of padding, for every text tower and its tokenizer (sentencepiece, the S3D word list)


@dataclass(frozen=True)
class TextInput:
    """A text tower eats up to `max_tokens` token ids from a vocabulary of `vocab_size` (`PAD_ID` is padding)."""

    max_tokens: int
    vocab_size: int


def normalize_video(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Frames with values in [0, 255] (uint8, or float from the augmentation step), channels on dim -4
    (`(..., C, T, H, W)`) -> float32 `(x / 255 - mean) / std`, the model's input (`VideoInput.mean/std`).

    float32 input is normalised in place. Constants go in as Python scalars, so no host-to-device copy stalls
    an accelerator's queue."""
    import torch

    x = x if x.dtype == torch.float32 else x.float()
    for c, (m, s) in enumerate(zip(mean, std)):
        x.select(-4, c).mul_(1 / (255 * s)).sub_(m / s)
    return x

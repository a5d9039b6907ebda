"""Audio for the loader: decode FLAC/WAV bytes, cut the window aligned with a video clip, log-mel, augment.

Alignment is by time, never by sample counts of a decoded stream: a window starting at `start` seconds
starts at sample `round(start * sample_rate)` of the shard's audio, which data_prep wrote from the same
chunk start as the video. Spectrograms are float32 `(1, F, Ta)`.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import soundfile
import torch
import torchaudio

LOG_EPS = 1e-6


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sample rate, from FLAC or WAV bytes (soundfile)."""
    wav, sr = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (N, channels)
    return wav.mean(axis=1), int(sr)


def read_window(data: bytes, start: float, seconds: float) -> tuple[np.ndarray, int]:
    """Decode only `seconds` of mono audio from `start` seconds (FLAC/WAV seek), zero-padded past either end.

    Returns the window at the file's own sample rate, and that rate.
    """
    with soundfile.SoundFile(io.BytesIO(data)) as f:
        sr = f.samplerate
        n, first = round(seconds * sr), round(start * sr)
        lo, hi = max(first, 0), min(first + n, f.frames)
        out = np.zeros(n, dtype=np.float32)
        if hi > lo:
            f.seek(lo)
            got = f.read(hi - lo, dtype="float32", always_2d=True).mean(axis=1)  # (hi - lo,)
            out[lo - first : lo - first + len(got)] = got
    return out, int(sr)


def audio_window(wav: np.ndarray, sample_rate: int, start: float, seconds: float) -> np.ndarray:
    """`seconds` of audio from `start` seconds, zero-padded where the window leaves the recording."""
    n = round(seconds * sample_rate)
    first = round(start * sample_rate)
    out = np.zeros(n, dtype=np.float32)
    lo, hi = max(first, 0), min(first + n, len(wav))
    if hi > lo:
        out[lo - first : hi - first] = wav[lo:hi]
    return out


@functools.lru_cache(maxsize=8)
def _mel_transform(sample_rate: int, num_mel_bins: int, win: int, hop: int) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate, n_fft=win, win_length=win, hop_length=hop, n_mels=num_mel_bins, center=True
    )


def log_mel(
    wav: np.ndarray, sample_rate: int, num_mel_bins: int, win_length_ms: float, hop_length_ms: float
) -> torch.Tensor:
    """Log-mel spectrogram `(1, F, Ta)` of a mono window (centred STFT, Ta = len // hop + 1)."""
    win = round(sample_rate * win_length_ms / 1000)
    hop = round(sample_rate * hop_length_ms / 1000)
    mel = _mel_transform(sample_rate, num_mel_bins, win, hop)
    with torch.no_grad():
        spec = mel(torch.from_numpy(wav).unsqueeze(0))  # (1, F, Ta)
    return torch.log(spec + LOG_EPS)


def silent_log_mel(num_mel_bins: int, num_frames: int) -> torch.Tensor:
    """The spectrogram of a silent source: zeros `(1, F, Ta)` (has_audio=False marks it)."""
    return torch.zeros(1, num_mel_bins, num_frames)


def volume_jitter(wav: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Scale the waveform by a gain drawn from U(1 - amount, 1 + amount) (GDT uses 0.1)."""
    if amount <= 0:
        return wav
    return wav * np.float32(rng.uniform(1 - amount, 1 + amount))


def spec_augment(
    spec: torch.Tensor,
    rng: np.random.Generator,
    freq_masks: int = 1,
    freq_width: int = 3,
    time_masks: int = 1,
    time_width: int = 6,
) -> torch.Tensor:
    """Zero `freq_masks` bands of width < `freq_width` and `time_masks` spans of width < `time_width`.

    GDT's "medium" preset (no time warp); masks are set to 0 as there. Uses `rng`, not torch's global RNG,
    so views stay reproducible under any worker layout.
    """
    spec = spec.clone()
    _, f, t = spec.shape
    for _ in range(freq_masks):
        w = int(rng.integers(0, freq_width))
        f0 = int(rng.integers(0, max(f - w, 0) + 1))
        spec[:, f0 : f0 + w, :] = 0
    for _ in range(time_masks):
        w = int(rng.integers(0, time_width))
        t0 = int(rng.integers(0, max(t - w, 0) + 1))
        spec[:, :, t0 : t0 + w] = 0
    return spec


def resample(wav: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Resample mono audio (torchaudio's windowed-sinc); a no-op when the rates match."""
    if orig == new:
        return wav
    out = torchaudio.functional.resample(torch.from_numpy(wav), orig, new)
    return out.numpy()

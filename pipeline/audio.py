"""Audio for the loader: decode FLAC/WAV bytes, cut the window aligned with a video clip, log-mel.

Augmentation (gain, SpecAugment) is drawn in the worker and applied batched by `pipeline.augment`.

Alignment is by time, never by sample counts of a decoded stream: a window starting at `start` seconds
starts at sample `round(start * sample_rate)` of the shard's audio, which data_prep wrote from the same
chunk start as the video. Spectrograms are float32 `(1, F, Ta)`.
"""

from __future__ import annotations

import functools
import io
import struct
from collections.abc import Callable, Sequence

import numpy as np
import soundfile
import torch
import torchaudio

LOG_EPS = 1e-6
WAVE_FORMAT_PCM, WAVE_FORMAT_EXTENSIBLE = 0x0001, 0xFFFE


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sample rate, from FLAC or WAV bytes (soundfile)."""
    wav, sr = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (N, channels)
    return wav.mean(axis=1), int(sr)


def read_window(data: bytes, start: float, seconds: float) -> tuple[np.ndarray, int]:
    """Decode only `seconds` of mono audio from `start` seconds (FLAC/WAV seek), zero-padded past either end.

    Returns the window at the file's own sample rate, and that rate.
    """
    windows, sr = read_windows(data, [start], seconds)
    return windows[0], sr


def read_windows(data: bytes, starts: Sequence[float], seconds: float) -> tuple[np.ndarray, int]:
    """`read_window` for several starts with one open of the file: `(len(starts), n)` float32 and the rate.

    Each window is a seek and a decode of just its samples (a FLAC seek lands on the frame holding the
    sample), so a GDT sample's two windows cost two short decodes, never the whole chunk. A plain 16-bit
    PCM WAV (`vatp data build --audio-format wav`) needs no decoder: its windows are slices of the bytes.
    """
    pcm = _pcm16_wav(data)
    if pcm is not None:
        samples, sr = pcm  # (N, channels) int16, a view of `data`
        # int16 / 32768, exactly the floats libsndfile returns for 16-bit PCM
        return _cut_windows(lambda lo, hi: samples[lo:hi] * np.float32(1 / 32768), len(samples), sr, starts, seconds)
    with soundfile.SoundFile(io.BytesIO(data)) as f:

        def read(lo: int, hi: int) -> np.ndarray:
            f.seek(lo)
            return f.read(hi - lo, dtype="float32", always_2d=True)  # (hi - lo, channels)

        return _cut_windows(read, f.frames, f.samplerate, starts, seconds)


def _cut_windows(
    read: Callable[[int, int], np.ndarray], total: int, sr: int, starts: Sequence[float], seconds: float
) -> tuple[np.ndarray, int]:
    """Windows `(W, n)` from `read(lo, hi) -> (hi - lo, channels)` float32, zero-padded outside [0, total)."""
    n = round(seconds * sr)
    out = np.zeros((len(starts), n), dtype=np.float32)
    for row, start in zip(out, starts):
        first = round(start * sr)
        lo, hi = max(first, 0), min(first + n, total)
        if hi > lo:
            got = read(lo, hi)
            row[lo - first : lo - first + len(got)] = got[:, 0] if got.shape[1] == 1 else got.mean(axis=1)
    return out, int(sr)


def _pcm16_wav(data: bytes) -> tuple[np.ndarray, int] | None:
    """The int16 samples `(N, channels)` and rate of a 16-bit PCM WAV, viewed in place; None for anything else."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = pos + 8
        if chunk == b"fmt " and size >= 16 and body + size <= len(data):
            tag, channels, sr, _, _, bits = struct.unpack_from("<HHIIHH", data, body)
            if tag == WAVE_FORMAT_EXTENSIBLE and size >= 26:
                tag = int.from_bytes(data[body + 24 : body + 26], "little")  # the sub-format GUID starts with it
            fmt = (tag, channels, sr, bits)
        elif chunk == b"data":
            if fmt is None or fmt[0] != WAVE_FORMAT_PCM or fmt[3] != 16 or fmt[1] < 1 or fmt[2] < 1:
                return None
            channels = fmt[1]
            count = (min(body + size, len(data)) - body) // (2 * channels)  # a streamed header may overstate size
            samples = np.frombuffer(data, dtype="<i2", count=count * channels, offset=body)
            return samples.reshape(count, channels), fmt[2]
        pos = body + size + (size & 1)  # chunks are word-aligned
    return None


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
def _mel_basis(sample_rate: int, num_mel_bins: int, n_fft: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hann window `(n_fft,)` and HTK mel filterbank `(F, n_fft // 2 + 1)`, built once per worker and setting.

    The same window and filters as `torchaudio.transforms.MelSpectrogram` with its defaults (periodic Hann,
    f_min 0, f_max sr / 2, no filter normalisation).
    """
    window = torch.hann_window(n_fft)
    fb = torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, 0.0, sample_rate / 2, num_mel_bins, sample_rate)
    return window, fb.T.contiguous()


def log_mel(
    wav: np.ndarray, sample_rate: int, num_mel_bins: int, win_length_ms: float, hop_length_ms: float
) -> torch.Tensor:
    """Log-mel spectrogram `(1, F, Ta)` of a mono window (centred STFT, Ta = len // hop + 1).

    A batch of windows `(B, N)` gives `(B, 1, F, Ta)`. Equals `log(MelSpectrogram(power=2)(wav) + 1e-6)` of
    torchaudio (n_fft = win length, reflect padding) to float rounding, from a cached window and filterbank:
    framing and the power spectrum in numpy, the FFT and the filterbank matmul in torch (float32 throughout).
    """
    win = round(sample_rate * win_length_ms / 1000)
    hop = round(sample_rate * hop_length_ms / 1000)
    window, fb = _mel_basis(sample_rate, num_mel_bins, win)
    x = np.asarray(wav, dtype=np.float32)
    frames = _reflect_frames(x.reshape(-1, x.shape[-1]), win, hop) * window.numpy()  # (B, Ta, win)
    spec = torch.fft.rfft(torch.from_numpy(frames)).numpy()  # (B, Ta, win // 2 + 1) complex64
    power = np.square(spec.real) + np.square(spec.imag)
    mel = torch.matmul(fb, torch.from_numpy(power).mT)  # (B, F, Ta)
    out = mel.add_(LOG_EPS).log_()
    return out.reshape(*x.shape[:-1], 1, *out.shape[1:])


def _reflect_frames(x: np.ndarray, win: int, hop: int) -> np.ndarray:
    """Frames `(B, Ta, win)` of `x (B, N)` reflect-padded by win // 2 on both sides (torch.stft's centring)."""
    b, n = x.shape
    pad = win // 2
    if n <= pad:
        raise ValueError(f"an audio window of {n} samples is too short for a {win}-sample STFT window")
    padded = np.empty((b, n + 2 * pad), dtype=np.float32)  # (B, N + 2 pad)
    padded[:, pad : pad + n] = x
    padded[:, :pad] = x[:, pad:0:-1]
    padded[:, pad + n :] = x[:, -2 : -pad - 2 : -1]
    num_frames = 1 + (n + 2 * pad - win) // hop
    step, item = padded.strides
    return np.lib.stride_tricks.as_strided(padded, (b, num_frames, win), (step, hop * item, item), writeable=False)


def silent_log_mel(num_mel_bins: int, num_frames: int) -> torch.Tensor:
    """The spectrogram of a silent source: zeros `(1, F, Ta)` (has_audio=False marks it)."""
    return torch.zeros(1, num_mel_bins, num_frames)


def resample(wav: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Resample mono audio (torchaudio's windowed-sinc); a no-op when the rates match."""
    if orig == new:
        return wav
    out = torchaudio.functional.resample(torch.from_numpy(wav), orig, new)
    return out.numpy()

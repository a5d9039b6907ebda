"""Audio for the loader: FLAC/WAV decode, time-aligned windows, log-mel shapes, SpecAugment, volume jitter."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
import torch

from models.contracts import AudioInput
from pipeline import audio as A


def encoded(wav: np.ndarray, sr: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, wav, sr, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["FLAC", "WAV"])
def test_decode_audio_round_trips_flac_and_wav(fmt):
    wav = (np.sin(np.arange(8000) / 5) * 0.5).astype(np.float32)
    got, sr = A.decode_audio(encoded(wav, 16000, fmt))
    assert sr == 16000 and got.dtype == np.float32 and np.abs(got - wav).max() < 1e-3


def test_audio_window_starts_at_the_clip_time_and_zero_pads():
    sr = 1000
    wav = np.zeros(2000, dtype=np.float32)
    wav[700] = 1.0  # an impulse at 0.7 s
    win = A.audio_window(wav, sr, 0.5, 0.5)
    assert win.shape == (500,) and win[200] == 1.0 and win.sum() == 1.0
    tail = A.audio_window(wav, sr, 1.8, 0.5)
    assert tail.shape == (500,) and (tail[200:] == 0).all()
    before = A.audio_window(wav, sr, -0.1, 1.0)
    assert before[800] == 1.0 and (before[:100] == 0).all()


def test_log_mel_shape_matches_the_audio_contract():
    contract = AudioInput(sample_rate=16000, num_mel_bins=40, seconds=1.0)
    wav = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    spec = A.log_mel(wav, 16000, 40, contract.win_length_ms, contract.hop_length_ms)
    assert spec.shape == (1, 40, contract.num_frames) and spec.dtype == torch.float32
    assert A.silent_log_mel(40, contract.num_frames).shape == spec.shape


def test_log_mel_places_an_impulse_at_its_time():
    wav = np.zeros(16000, dtype=np.float32)
    wav[8000:8080] = 1.0  # 0.5 s
    spec = A.log_mel(wav, 16000, 40, 25.0, 10.0)
    assert abs(int(spec[0].sum(0).argmax()) - 50) <= 2


def test_resample_changes_length_by_the_rate_ratio():
    wav = np.random.default_rng(0).standard_normal(48000).astype(np.float32)
    assert A.resample(wav, 48000, 16000).shape == (16000,)
    assert A.resample(wav, 16000, 16000) is wav


@pytest.mark.parametrize("fmt", ["FLAC", "WAV"])
def test_read_window_equals_the_slice_of_the_full_decode(fmt):
    wav = np.random.default_rng(0).uniform(-0.5, 0.5, 16000 * 3).astype(np.float32)
    data = encoded(wav, 16000, fmt)
    full, sr = A.decode_audio(data)
    for start in (0.0, 1.234, 2.7, -0.2):
        got, got_sr = A.read_window(data, start, 0.5)
        assert got_sr == sr and np.array_equal(got, A.audio_window(full, sr, start, 0.5))


@pytest.mark.parametrize("sr, mels, seconds", [(16000, 40, 1.0), (16000, 80, 2.0), (22050, 64, 0.7), (8000, 16, 0.5)])
def test_log_mel_equals_torchaudio_melspectrogram_plus_log(sr, mels, seconds):
    """The cached-filterbank log-mel is the torchaudio transform it replaced (odd n_fft at 22.05 kHz too)."""
    import torchaudio

    rng = np.random.default_rng(sr)
    wav = (rng.standard_normal(round(sr * seconds)) * 0.1).astype(np.float32)
    wav[: sr // 10] = 0  # a silent stretch: log of the epsilon floor
    win, hop = round(sr * 0.025), round(sr * 0.010)
    transform = torchaudio.transforms.MelSpectrogram(
        sample_rate=sr, n_fft=win, win_length=win, hop_length=hop, n_mels=mels, center=True
    )
    want = torch.log(transform(torch.from_numpy(wav).unsqueeze(0)) + A.LOG_EPS)  # (1, F, Ta)
    got = A.log_mel(wav, sr, mels, 25.0, 10.0)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got - want).abs().max() < 1e-4
    batch = A.log_mel(np.stack([wav, wav[::-1].copy()]), sr, mels, 25.0, 10.0)  # (2, 1, F, Ta)
    assert batch.shape == (2, *want.shape) and torch.allclose(batch[0], got, atol=1e-5)
    assert not torch.allclose(batch[1], got)


def test_log_mel_rejects_a_window_shorter_than_half_the_fft():
    with pytest.raises(ValueError, match="too short"):
        A.log_mel(np.zeros(100, dtype=np.float32), 16000, 40, 25.0, 10.0)


@pytest.mark.parametrize(
    "fmt, subtype, channels",
    [("FLAC", "PCM_24", 1), ("WAV", "PCM_16", 1), ("WAV", "PCM_16", 2), ("WAV", "FLOAT", 1), ("FLAC", "PCM_16", 2)],
)
def test_read_windows_equals_the_slices_of_the_full_decode(fmt, subtype, channels):
    wav = np.random.default_rng(1).uniform(-0.5, 0.5, (16000 * 3, channels)).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, wav, 16000, format=fmt, subtype=subtype)
    data = buf.getvalue()
    full, sr = A.decode_audio(data)
    starts = [2.7, 0.0, -0.2, 1.234, 2.9, 5.0]
    got, got_sr = A.read_windows(data, starts, 0.5)
    assert got_sr == sr and got.shape == (len(starts), 8000) and got.dtype == np.float32
    for row, start in zip(got, starts):
        assert np.array_equal(row, A.audio_window(full, sr, start, 0.5))
    assert not got[-1].any()  # past the end: all padding


def test_pcm16_wav_is_sliced_in_place_and_other_wavs_fall_back():
    wav = (np.arange(-300, 300) * 50).astype(np.int16)
    plain = encoded(wav, 8000, "WAV")  # soundfile writes 16-bit PCM by default for int16
    samples, sr = A._pcm16_wav(plain)
    assert sr == 8000 and samples.shape == (600, 1) and np.array_equal(samples[:, 0], wav)
    # A chunk of odd size before "data" (padded to even, as RIFF requires) must be skipped.
    pos = plain.index(b"data")
    junk = b"LIST" + (3).to_bytes(4, "little") + b"abc\x00"
    padded = plain[:pos] + junk + plain[pos:]
    padded = padded[:4] + (len(padded) - 8).to_bytes(4, "little") + padded[8:]
    assert np.array_equal(A._pcm16_wav(padded)[0], samples)
    assert np.array_equal(A.read_window(padded, 0.01, 0.02)[0], A.read_window(plain, 0.01, 0.02)[0])
    buf = io.BytesIO()
    soundfile.write(buf, wav.astype(np.float32) / 32768, 8000, format="WAV", subtype="FLOAT")
    assert A._pcm16_wav(buf.getvalue()) is None and A._pcm16_wav(encoded(wav, 8000, "FLAC")) is None
    assert A._pcm16_wav(plain[:40]) is None  # header cut before the data chunk

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


def test_spec_augment_masks_are_bounded_and_reproducible():
    spec = torch.ones(1, 40, 101)
    a = A.spec_augment(spec, np.random.default_rng(1), freq_masks=2, freq_width=5, time_masks=2, time_width=8)
    b = A.spec_augment(spec, np.random.default_rng(1), freq_masks=2, freq_width=5, time_masks=2, time_width=8)
    assert torch.equal(a, b) and torch.equal(spec, torch.ones(1, 40, 101))  # input untouched
    zero_rows = (a[0] == 0).all(dim=1).sum()
    zero_cols = (a[0] == 0).all(dim=0).sum()
    assert zero_rows <= 2 * 4 and zero_cols <= 2 * 7
    masked = [A.spec_augment(spec, np.random.default_rng(s)) for s in range(20)]
    assert any((m == 0).any() for m in masked)


def test_volume_jitter_scales_within_range():
    wav = np.ones(10, dtype=np.float32)
    gains = [A.volume_jitter(wav, 0.1, np.random.default_rng(s))[0] for s in range(50)]
    assert 0.9 <= min(gains) < max(gains) <= 1.1
    assert A.volume_jitter(wav, 0.0, np.random.default_rng(0)) is wav


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

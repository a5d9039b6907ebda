"""The sound side of the synthetic corpus: class tones (pitch, timbre, rhythm), contact clicks, panning, noise.

Everything is a pure function of its arguments and the `rng` it is given, so a video's audio is
reproducible from the corpus seed. Times are in seconds from the start of the video.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

# Harmonic amplitudes (fundamental first) that give each timbre its colour.
TIMBRES = {
    "sine": (1.0,),
    "square": (1.0, 0.0, 1 / 3, 0.0, 1 / 5, 0.0, 1 / 7, 0.0, 1 / 9),
    "saw": (1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6, 1 / 7, 1 / 8),
}

# Rhythm = how a segment's tone is cut into notes: (period s, note offsets within a period, note length s).
# "steady" is one sustained note per segment.
RHYTHMS = {
    "steady": None,
    "pulse": (0.25, (0.0,), 0.12),
    "double": (0.7, (0.0, 0.16), 0.1),
    "sparse": (0.6, (0.0,), 0.3),
}

TONE_LEVEL = 0.35
CLICK_LEVEL = 0.9
CLICK_SECONDS = 0.02


def render_audio(
    *,
    seconds: float,
    sample_rate: int,
    channels: int,
    segments: list[tuple[float, float]],
    contacts: list[float],
    pan_times: np.ndarray,
    pan_x: np.ndarray,
    pitch_hz: float,
    timbre: str,
    rhythm: str,
    loudness: float,
    noise_level: float,
    jitter_s: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Float32 `(samples, channels)` audio in [-1, 1] for one video.

    Each segment `(start, end)` plays the class tone cut by its rhythm; the first note starts exactly
    at the segment start (the object's appearance), later ones are jittered by ~`jitter_s`.
    `contacts` are the times of the visual contact frames: each gets a broadband click.
    `pan_x` (0 = left edge, 1 = right edge) at `pan_times` places the sound in a stereo image.
    """
    if timbre not in TIMBRES:
        raise ValueError(f"unknown timbre {timbre!r}; expected one of {sorted(TIMBRES)}")
    if rhythm not in RHYTHMS:
        raise ValueError(f"unknown rhythm {rhythm!r}; expected one of {sorted(RHYTHMS)}")
    n = int(round(seconds * sample_rate))
    dry = np.zeros(n, np.float32)
    for start, end in segments:
        for onset, length, sustained in _notes(start, end, rhythm, jitter_s, rng):
            _add_note(dry, onset, length, sustained, pitch_hz, timbre, sample_rate)
    for t in contacts:
        _add_click(dry, t, sample_rate, rng)
    dry *= loudness

    if channels == 1:
        out = dry[:, None]
    else:
        # Equal-power pan that follows the object across the screen.
        x = np.interp(np.arange(n) / sample_rate, pan_times, pan_x).astype(np.float32)
        theta = np.clip(x, 0.0, 1.0) * (np.pi / 2)
        out = np.stack([dry * np.cos(theta), dry * np.sin(theta)], axis=1)  # (n, 2)
    out = out + noise_level * rng.standard_normal(out.shape, dtype=np.float32)
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write `(samples, channels)` float audio as 16-bit PCM WAV (what ffmpeg then encodes to AAC)."""
    sf.write(str(path), audio, sample_rate, subtype="PCM_16", format="WAV")


def _notes(start: float, end: float, rhythm: str, jitter_s: float, rng: np.random.Generator):
    """Yield `(onset, length, sustained)` for the notes of one segment."""
    pattern = RHYTHMS[rhythm]
    if pattern is None:
        yield start, end - start, True
        return
    period, offsets, length = pattern
    beat = start
    while beat < end:
        for k, off in enumerate(offsets):
            onset = beat + off
            if beat > start or k > 0:
                onset += float(rng.normal(0.0, jitter_s))
            if start <= onset < end:
                yield onset, min(length, end - onset), False
        beat += period


def _add_note(buf: np.ndarray, onset: float, length: float, sustained: bool, pitch: float, timbre: str, sr: int):
    i0 = int(round(onset * sr))
    i1 = min(len(buf), i0 + int(round(length * sr)))
    if i1 <= i0:
        return
    t = np.arange(i1 - i0, dtype=np.float32) / sr
    wave = np.zeros_like(t)
    for k, amp in enumerate(TIMBRES[timbre], start=1):
        if amp and k * pitch < 0.45 * sr:
            wave += amp * np.sin(2 * np.pi * k * pitch * t)
    wave /= sum(TIMBRES[timbre])
    attack = np.minimum(t / 0.004, 1.0)
    if sustained:  # fall to a sustain level, release over the last 30 ms
        env = 0.5 + 0.5 * np.exp(-t / 0.15)
        env *= np.clip((length - t) / 0.03, 0.0, 1.0)
    else:  # percussive: fast attack, exponential decay, short release so notes never end in a step
        env = np.exp(-t / (length / 2.5)) * np.clip((length - t) / 0.01, 0.0, 1.0)
    buf[i0:i1] += TONE_LEVEL * attack * env * wave


def _add_click(buf: np.ndarray, t: float, sr: int, rng: np.random.Generator) -> None:
    i0 = int(round(t * sr))
    i1 = min(len(buf), i0 + int(round(CLICK_SECONDS * sr)))
    if not 0 <= i0 < i1:
        return
    tau = np.arange(i1 - i0, dtype=np.float32) / sr
    buf[i0:i1] += CLICK_LEVEL * np.exp(-tau / 0.004) * rng.uniform(-1.0, 1.0, i1 - i0).astype(np.float32)

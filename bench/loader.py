"""Loader throughput vs the same per-sample work in a plain loop, measured in one run.

    .venv/bin/python bench/loader.py                    # builds a small synth dataset in a temp dir
    .venv/bin/python bench/loader.py --audio-format wav # the synth dataset with 16-bit WAV instead of FLAC
    .venv/bin/python bench/loader.py --dataset DIR      # or use a built one (needs tokenizer.model for text)

Prints, at the quickstart clip size (8 frames, 64 px, ~10 fps, 1 s audio, MIL-NCE views with K=4 captions):
clips/s of the loader with 0, 1 and 2 workers; clips/s of a plain single-process loop over the same shards
calling the same per-sample function; the ratio loader / (workers x loop) (goal >= 0.9); frames decoded
per frame used; and the share of per-sample time spent in audio and text (goal <= 10 %).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.contracts import AudioInput, TextInput, VideoInput  # noqa: E402
from pipeline import views  # noqa: E402
from pipeline.data import DataConfig, DatasetSource, TextConfig, make_train_loader, resolve_inputs  # noqa: E402

CONTRACTS = dict(video=VideoInput(8, 64, 10.0), audio=AudioInput(16000, 40, 1.0), text=TextInput(16, 1000))


def build_dataset(root: Path, audio_format: str = "flac") -> Path:
    from data_prep.build import build_dataset as build
    from data_prep.synth import make_synth_corpus
    from data_prep.tokenizer import train_tokenizer

    make_synth_corpus(root / "synth", videos=16, seed=0, seconds=8.0, width=128, height=96, fps=20, workers=2)
    build(root / "synth", root / "ds", fps=10, short_side=64, max_seconds=30.0, sample_rate=16000,
          samples_per_shard=4, workers=2, audio_format=audio_format)  # fmt: skip
    train_tokenizer(root / "ds", vocab_size=200)
    return root / "ds"


def read_samples(dataset: Path) -> list[dict]:
    """All raw samples of the dataset, grouped by key, as the tar stage would hand them over."""
    samples: dict[str, dict] = {}
    for shard in sorted((dataset / "shards").glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
    return [samples[k] for k in sorted(samples)]


def plain_loop(cfg: DataConfig, raws: list[dict], clips: int) -> dict:
    """The per-sample function in a loop (read from memory), timing audio and text and counting decoded frames."""
    from data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.text.tokenizer)
    check = views.CheckSample(cfg, {})
    timers = {"audio": 0.0, "text": 0.0}
    opened = []

    def timed(name, fn):
        # CPU time of this thread only: decord's decoder threads keep working while a helper runs, and
        # process_time would count their work as the helper's (it inflated the audio share about 1.6x).
        def run(*a, **k):
            t = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                timers[name] += time.thread_time() - t

        return run

    # The audio helpers nest (_audio_view calls the other two): time the leaves so nothing counts twice.
    orig = views._audio_windows, views._audio_spec, views._tokenize, views.Vd.open_video
    views._audio_windows, views._audio_spec = timed("audio", orig[0]), timed("audio", orig[1])
    views._tokenize = timed("text", orig[2])
    views.Vd.open_video = lambda data, backend: opened.append(orig[3](data, backend)) or opened[-1]
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        for n in range(clips):
            views.sample_views(check(dict(raws[n % len(raws)])), cfg, np.random.default_rng(n), tok)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        views._audio_windows, views._audio_spec, views._tokenize, views.Vd.open_video = orig
    used = clips * cfg.num_frames
    decoded = sum(v.decoded_frames for v in opened)
    return {"clips_s": clips / wall, "clips_cpu_s": clips / cpu, "decoded_per_used": decoded / used,
            "audio_share": timers["audio"] / cpu, "text_share": timers["text"] / cpu}  # fmt: skip


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the DataLoader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def loader_rate(cfg: DataConfig, workers: int, clips: int) -> tuple[float, float]:
    """Clips per wall-second and per CPU-second (main process + workers, startup included)."""
    cfg = dataclasses.replace(cfg, num_workers=workers, epoch_samples=clips)
    loader = make_train_loader(cfg, rank=0, world_size=1, seed=0)
    t0, c0, n = time.perf_counter(), cpu_seconds(), 0
    for batch in loader:
        n += len(batch["idx"])
    wall = time.perf_counter() - t0
    loader.close()  # joins the workers, so their CPU time is in RUSAGE_CHILDREN
    return n / wall, n / (cpu_seconds() - c0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, help="a built dataset dir (default: build a synth one in a temp dir)")
    ap.add_argument("--clips", type=int, default=2048, help="clips per measurement (amortises worker start-up)")
    ap.add_argument("--decoder", default="decord", choices=["decord", "pyav"])
    ap.add_argument("--audio-format", default="flac", choices=["flac", "wav"], help="audio of the synth dataset")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the loop and each DataLoader worker get one core
    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset or build_dataset(Path(tmp), args.audio_format)
        text = TextConfig(num_captions=4, tokenizer=str(dataset / "tokenizer.model"))
        base = DataConfig(datasets=[DatasetSource(str(dataset))], views="milnce", batch_size=8, shuffle_buffer=64,
                          decoder=args.decoder, text=text)  # fmt: skip
        cfg = resolve_inputs(base, **CONTRACTS)
        raws = read_samples(dataset)
        plain_loop(cfg, raws, 16)  # warm-up: imports, mel filterbank, tokenizer
        loop = plain_loop(cfg, raws, args.clips)
        rates = {w: loader_rate(cfg, w, args.clips) for w in (0, 1, 2)}
        loop_after = plain_loop(cfg, raws, args.clips)  # the machine is shared: bracket the loader runs
    raw = (loop["clips_s"] + loop_after["clips_s"]) / 2
    raw_cpu = (loop["clips_cpu_s"] + loop_after["clips_cpu_s"]) / 2
    audio = next((k for k in ("flac", "wav") if k in raws[0]), "no")
    print(f"\nloader benchmark: {len(raws)} samples ({audio} audio), {args.clips} clips per run, "
          f"decoder {args.decoder}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("                       clips/s  ratio to W x loop | clips/CPU-s  ratio to loop (goal >= 0.9)")
    print(f"plain loop            {raw:7.1f}                   | {raw_cpu:7.1f}")
    for w, (r, rc) in rates.items():
        print(f"loader, {w} workers    {r:7.1f}  {r / (max(w, 1) * raw):10.2f}        | {rc:7.1f}  {rc / raw_cpu:8.2f}")
    print(f"frames decoded per frame used  {loop['decoded_per_used']:.2f}")
    audio_share, text_share = ((loop[k] + loop_after[k]) / 2 for k in ("audio_share", "text_share"))
    print(f"share of sample time in audio  {audio_share:.1%} ({audio_share / raw_cpu * 1e3:.2f} ms), "
          f"text {text_share:.1%} ({text_share / raw_cpu * 1e3:.2f} ms) (together goal <= 10 %)")  # fmt: skip


if __name__ == "__main__":
    main()

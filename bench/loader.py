"""Loader cost at a training clip size, against bare decoding of the same frames, measured in one run.

    .venv/bin/python bench/loader.py                                   # quickstart size: 8x64@10 from 64 px
    .venv/bin/python bench/loader.py --clip 32x224@10 --source-short-side 256 --source-fps 16   # milnce_s3d
    .venv/bin/python bench/loader.py --clip 16x112@10 --source-short-side 128 --source-fps 16
    .venv/bin/python bench/loader.py --clip 30x112@30 --source-short-side 128 --source-fps 30 --views gdt
    .venv/bin/python bench/loader.py --dataset DIR                      # a built dataset (needs tokenizer.model)

The loader is set up as for a GPU run: workers decode and cut crop boxes, the batched augmentation runs in the
main process (`augment.where: device`), timed on its own. Prints, for one worker (one core):
- worker CPU per clip / bare decode CPU per clip (goal <= 1.15), where bare decode is decord's
  `VideoReader(bytes, num_threads=1).get_batch(indices)` on exactly the frames the view sampler picks (RGB);
- the same against the loader's own decoder in a plain loop (`--decoder auto`: PyAV to YUV planes), which
  is the loader's overhead over decoding alone;
- the augmentation step's ms per clip on this CPU (and on the GPU when CUDA exists);
- frames decoded per frame used (goal <= 1.6), bytes per clip handed from a worker to the main process;
- the CPU cores one H100 needs at 35 % MFU to be fed, from the model's FLOPs and the worker CPU per clip;
- the loader with 2 workers against 2 x the plain per-sample loop, and the audio/text share of a sample.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import re
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
from pipeline import video as Vd  # noqa: E402
from pipeline import views  # noqa: E402
from pipeline.batch_memory import collate_rows  # noqa: E402
from pipeline.data import make_train_loader  # noqa: E402
from pipeline.data_config import (  # noqa: E402
    AudioConfig,
    AugmentConfig,
    DataConfig,
    DatasetSource,
    TextConfig,
    resolve_inputs,  # noqa: E402
)
from pipeline.stages import CheckSample  # noqa: E402
from pipeline.views import decoder_for  # noqa: E402

H100_BF16_FLOPS, MFU = 989e12, 0.35
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward ~ 3x the forward's multiply-adds


def parse_clip(text: str) -> tuple[int, int, float]:
    m = re.fullmatch(r"(\d+)x(\d+)@([\d.]+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--clip {text!r}: expected FRAMESxSIZE@FPS, e.g. 32x224@10")
    return int(m[1]), int(m[2]), float(m[3])


def build_dataset(root: Path, short_side: int, fps: float, audio_format: str, videos: int = 16) -> Path:
    from data_prep.build import build_dataset as build
    from data_prep.synth import make_synth_corpus
    from data_prep.tokenizer import train_tokenizer

    long_side = round(short_side * 16 / 9)
    make_synth_corpus(
        root / "synth",
        videos=videos,
        seed=0,
        seconds=8.0,
        width=long_side + long_side % 2,
        height=short_side,
        fps=30,
        workers=2,
    )
    build(
        root / "synth",
        root / "ds",
        fps=fps,
        short_side=short_side,
        max_seconds=30.0,
        sample_rate=16000,
        samples_per_shard=4,
        workers=2,
        audio_format=audio_format,
    )
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
    """The per-sample function in a loop (read from memory) plus collation, one row per batch; also records
    which frames each clip decoded, for the bare-decode loop, and times audio and text."""
    from pipeline.dataset import load_tokenizer

    tok = load_tokenizer(cfg.text.tokenizer)
    check = CheckSample(cfg, {})
    timers = {"audio": 0.0, "text": 0.0}
    picked, data_of, decoded = [], {}, [0]

    def timed(name, fn):
        # CPU time of this thread only: decord's decoder threads keep working while a helper runs.
        def run(*a, **k):
            t = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                timers[name] += time.thread_time() - t

        return run

    def record_open(data, backend, size=None, pixels="rgb"):
        video = orig[2](data, backend, size, pixels)
        data_of[id(video)] = data
        return video

    def record_decode(video, start, num_frames, fps):
        picked.append((data_of[id(video)], Vd.frame_indices(start, num_frames, fps, video.fps, video.num_frames)))
        before = video.decoded_frames
        clip = orig[3](video, start, num_frames, fps)
        decoded[0] += video.decoded_frames - before
        return clip

    orig = views._audio_views, views._tokenize, views.Vd.open_video, views.Vd.decode_clip
    views._audio_views, views._tokenize = timed("audio", orig[0]), timed("text", orig[1])
    views.Vd.open_video, views.Vd.decode_clip = record_open, record_decode
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        for n in range(clips):
            row = views.sample_views(check(dict(raws[n % len(raws)])), cfg, np.random.default_rng(n), tok)
            collate_rows([row], {})
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        views._audio_views, views._tokenize, views.Vd.open_video, views.Vd.decode_clip = orig
    used = sum(len(idx) for _, idx in picked)
    return {
        "clips_s": clips / wall,
        "clips_cpu_s": clips / cpu,
        "decoded_per_used": decoded[0] / used,
        "audio_share": timers["audio"] / cpu,
        "text_share": timers["text"] / cpu,
        "picks": picked,
    }


def bare_decode(picks: list[tuple[bytes, list[int]]], samples: int) -> float:
    """CPU seconds per sample of decord decoding exactly the picked frames to RGB, nothing else (a GDT sample
    decodes two clips)."""
    import decord

    c0 = time.process_time()
    for data, idx in picks:
        decord.VideoReader(io.BytesIO(data), num_threads=1).get_batch(sorted(set(idx)))
    return (time.process_time() - c0) / samples


def bare_own_decode(picks: list[tuple[bytes, list[int]]], samples: int, decoder: str) -> float:
    """CPU seconds per sample of the loader's own decoder (as training views use it) on the picked frames."""
    backend, pixels = decoder_for(decoder, train=True)
    c0 = time.process_time()
    for data, idx in picks:
        Vd.open_video(data, backend, pixels=pixels).get_frames(idx)
    return (time.process_time() - c0) / samples


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used, from /proc (works for any worker start method)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def loader_run(cfg: DataConfig, workers: int, clips: int) -> dict:
    """One loader epoch of `clips` clips consumed as a GPU run would: the main process hands each batch on and
    releases it (on a GPU the copy and augmentation cost no CPU to speak of). CPU by process, per clip."""
    cfg = dataclasses.replace(cfg, num_workers=workers, epoch_samples=clips)
    loader = make_train_loader(cfg, rank=0, world_size=1, seed=0, device="cpu", raw=True)
    batches = iter(loader)
    first = next(batches)  # workers started and warm: count from here, so start-up is left out
    loader.release(first)
    pids = [w.pid for w in loader._stream._workers]
    t0, own0, workers0 = time.perf_counter(), own_cpu(), sum(process_cpu(p) for p in pids)
    n, handed, workers_cpu = 0, 0, 0.0
    for batch in batches:
        handed += sum(v.numel() * v.element_size() for v in batch.values() if torch.is_tensor(v))
        loader.release(batch)
        n += len(batch["idx"])
        if n == cfg.epoch_samples - len(first["idx"]):  # the last batch: read the workers while they are alive
            workers_cpu = sum(process_cpu(p) for p in pids) - workers0
    wall = time.perf_counter() - t0
    loader.close()
    return {"clips_s": n / wall, "worker_cpu": workers_cpu / n, "main_cpu": (own_cpu() - own0) / n, "bytes": handed / n}


def step_on_cpu(cfg: DataConfig, batches: list[dict]) -> float:
    """ms of CPU per clip of the batched augmentation on this CPU (one thread), over raw batches."""
    from pipeline.augment import augment_batch

    t, n = time.thread_time(), 0
    for batch in batches:
        augment_batch(dict(batch), cfg)
        n += len(batch["idx"])
    return (time.thread_time() - t) / n * 1e3


def step_on_gpu(cfg: DataConfig, batch: dict, repeats: int = 20) -> float | None:
    """ms per clip of the batched augmentation on a CUDA device, when there is one."""
    if not torch.cuda.is_available():
        return None
    from pipeline.augment import augment_batch

    dev = torch.device("cuda")
    on_gpu = {
        k: v.pin_memory().to(dev) if torch.is_tensor(v) and not k.endswith("_aug") else v for k, v in batch.items()
    }
    augment_batch(dict(on_gpu), cfg)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        augment_batch(dict(on_gpu), cfg)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats / len(batch["idx"]) * 1e3


def train_gflops(model: str, frames: int, size: int) -> float:
    """Forward + backward GFLOPs of one clip for video variant `model` at frames x size^2."""
    from models import build_encoder
    from models.flops import count_flops

    with torch.device("meta"):
        encoder = build_encoder(model)
        x = torch.zeros(1, 3, frames, size, size)
    return TRAIN_FLOPS_PER_FORWARD * count_flops(encoder.eval().forward_features, x) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip", type=parse_clip, default=(8, 64, 10.0), help="FRAMESxSIZE@FPS (default 8x64@10)")
    ap.add_argument("--source-short-side", type=int, default=64, help="short side of the synth dataset it builds")
    ap.add_argument("--source-fps", type=float, default=10.0, help="frame rate of the synth dataset it builds")
    ap.add_argument("--views", default="milnce", choices=["milnce", "gdt", "selflabel"])
    ap.add_argument("--audio", action="store_true", help="load audio too (milnce_s3d trains without)")
    ap.add_argument("--model", help="video variant for the FLOPs (default: s3d, r2plus1d_18 for GDT views)")
    ap.add_argument("--dataset", type=Path, help="a built dataset dir (default: build a synth one in a temp dir)")
    ap.add_argument("--videos", type=int, default=16, help="videos in the synth dataset it builds")
    ap.add_argument("--clips", type=int, default=512, help="clips per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of bare decoding and the loader")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--worker-start", default="fork", choices=["fork", "forkserver", "spawn"])
    ap.add_argument("--decoder", default="auto", choices=["auto", "decord", "pyav"], help="the loader's decoder")
    ap.add_argument("--audio-format", default="wav", choices=["flac", "wav"], help="audio of the synth dataset")
    args = ap.parse_args()
    frames, size, fps = args.clip
    model = args.model or ("r2plus1d_18" if args.views == "gdt" else "s3d")
    torch.set_num_threads(1)  # the loop, each DataLoader worker and the augmentation step get one core
    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset or build_dataset(
            Path(tmp), args.source_short_side, args.source_fps, args.audio_format, args.videos
        )
        base = DataConfig(
            datasets=[DatasetSource(str(dataset))],
            views=args.views,
            batch_size=args.batch_size,
            shuffle_buffer=64,
            audio=AudioConfig(enabled=args.audio or args.views != "milnce"),
            text=TextConfig(enabled=args.views == "milnce", num_captions=4, tokenizer=str(dataset / "tokenizer.model")),
            augment=AugmentConfig(where="device"),
            worker_start=args.worker_start,
            decoder=args.decoder,
        )
        contracts = dict(
            video=VideoInput(frames, size, fps), audio=AudioInput(16000, 40, frames / fps), text=TextInput(16, 1000)
        )
        cfg = resolve_inputs(base, **contracts)
        raws = read_samples(dataset)
        meta = json.loads(raws[0]["json"])
        plain_loop(cfg, raws, 8)  # warm-up: imports, mel filterbank, tokenizer
        loop = plain_loop(cfg, raws, args.clips)
        decodes, owns, ones = [bare_decode(loop["picks"], args.clips)], [], []
        for _ in range(args.rounds):  # the machine is shared: alternate the loader and the bare decoding
            owns.append(bare_own_decode(loop["picks"], args.clips, args.decoder))
            ones.append(loader_run(cfg, 1, args.clips))
            decodes.append(bare_decode(loop["picks"], args.clips))
        two = loader_run(cfg, 2, args.clips)
        raw_cfg = dataclasses.replace(cfg, num_workers=0, epoch_samples=32)
        raw = make_train_loader(raw_cfg, rank=0, world_size=1, seed=0, raw=True)
        raw_batches = list(raw)
        step_ms = step_on_cpu(cfg, raw_batches)
        gpu_ms = step_on_gpu(cfg, raw_batches[0])
    decode, own = float(np.mean(decodes)), float(np.mean(owns))
    one = {k: float(np.mean([r[k] for r in ones])) for k in ones[0]}
    gflops = train_gflops(model, frames, size)
    need = MFU * H100_BF16_FLOPS / (gflops * 1e9)  # clips per second one H100 trains
    print(
        f"\nloader benchmark: {frames}x{size}@{fps:g} {args.views} views ({'with' if cfg.audio.enabled else 'no'} "
        f"audio), stored {meta['width']}x{meta['height']} @ {meta['fps']:g} fps, {args.clips} clips per run, "
        f"batch {args.batch_size}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    backend, pixels = decoder_for(args.decoder, train=True)
    print(f"bare decode (decord get_batch to RGB, same frames) {decode * 1e3:7.2f} ms CPU per clip")
    print(f"bare decode ({backend} to {pixels}, the loader's own)  {own * 1e3:7.2f} ms CPU per clip")
    print(f"loader worker ({backend} to {pixels}), 1 worker      {one['worker_cpu'] * 1e3:7.2f} ms CPU per clip")
    print(f"worker CPU per clip / bare decode CPU per clip: {one['worker_cpu'] / decode:.2f}   (goal <= 1.15)")
    print(f"worker CPU per clip / its own decoder's bare CPU: {one['worker_cpu'] / own:.2f}   (the loader's overhead)")
    print(f"augmentation step on this CPU (one thread)      {step_ms:7.2f} ms per clip")
    if gpu_ms is not None:
        print(f"augmentation step on {torch.cuda.get_device_name()}  {gpu_ms:7.3f} ms per clip")
    else:
        print("augmentation step on a GPU                      not measured (no CUDA device)")
    print(f"main process CPU per clip (receiving batches)   {one['main_cpu'] * 1e3:7.2f} ms")
    print(f"frames decoded per frame used                   {loop['decoded_per_used']:7.2f}   (goal <= 1.6)")
    print(f"bytes per clip, worker -> main process          {one['bytes'] / 1e6:7.2f} MB")
    print(f"model {model}: {gflops:.1f} GFLOP per training clip; one H100 at {MFU:.0%} MFU trains {need:,.0f} clips/s")
    print(
        f"cores needed per H100 at 35 % MFU: {need * one['worker_cpu']:,.0f} (bare decode alone: {need * decode:,.0f})"
    )
    print(f"loader, 2 workers / (2 x plain loop), clips/s: {two['clips_s'] / (2 * loop['clips_s']):.2f}")
    print(f"share of sample time in audio {loop['audio_share']:.1%}, text {loop['text_share']:.1%}")


if __name__ == "__main__":
    main()

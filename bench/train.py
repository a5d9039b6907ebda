"""Training speed: clips/s, the share of step time spent waiting for data, and achieved GFLOP/s as a ratio to
this machine's matmul ceiling measured in the same run.

    .venv/bin/python bench/train.py [--steps 6] [--dataset DIR] [--e2e-steps 60]

Part 1 (model only, synthetic batches through the DeepSpeed engine): the quickstart setting, milnce_s3d tiny
and milnce_s3d at full width (S3D-G, reduced clip size so it fits a CPU). Part 2 (end to end): the quickstart
recipe through `train()` on real shards (a small synthetic dataset is built when --dataset is not given),
reporting clips/s and data-wait share as the loop logs them. With CUDA, both parts run on the GPU instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.towers import ModelConfig, SpaceConfig, build_model  # noqa: E402
from pipeline.distributed import init_distributed  # noqa: E402
from pipeline.engine import build_engine  # noqa: E402
from pipeline.losses import LossConfig, MilNCEConfig, build_objective  # noqa: E402
from pipeline.train_config import OptimConfig, RunConfig  # noqa: E402

SETTINGS = {  # name -> (video variant, frames, size, batch)
    "quickstart (r2plus1d_tiny 8x48x48)": ("r2plus1d_tiny", 8, 48, 16),
    "milnce_s3d_tiny (s3d_tiny 8x32x32)": ("s3d_tiny", 8, 32, 4),
    "milnce_s3d full width (s3d 8x96x96)": ("s3d", 8, 96, 2),
}


def matmul_ceiling(device: torch.device, n: int = 1024, seconds: float = 2.0) -> float:
    """fp32 GFLOP/s of a square matmul loop on `device` (the roofline we compare against)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - t0) / 1e9


def model_throughput(variant: str, frames: int, size: int, batch: int, steps: int, dist_info) -> dict:
    """Clips/s and GFLOP/s of full training steps (forward, MIL-NCE, backward, AdamW) on synthetic batches."""
    cfg = ModelConfig(
        video=variant,
        text="text_tiny",
        vocab_size=256,
        num_frames=frames,
        size=size,
        spaces=[SpaceConfig("vt", ["video", "text"], dim=64, head="linear")],
    )
    run = RunConfig(name="bench", steps=steps + 2, batch_size=batch, device=dist_info.device.type)
    engine = build_engine(build_model(cfg), run, OptimConfig(lr=1e-4), dist_info)
    objective = build_objective(LossConfig(milnce=MilNCEConfig(temperature=0.1)), num_samples=1)
    dev = dist_info.device
    data = {
        "video": torch.randint(0, 255, (batch, 1, 3, frames, size, size), dtype=torch.uint8, device=dev),
        "text": torch.randint(1, 256, (batch, 4, 16), device=dev),
        "text_mask": torch.ones(batch, 4, 16, dtype=torch.bool, device=dev),
    }

    def step():
        loss, _ = objective({k: v.float() for k, v in engine(data).items()}, data)
        engine.backward(loss)
        engine.step()

    with FlopCounterMode(display=False) as counter:
        step()  # warm-up step, counted: forward + backward FLOPs of one training step
    flops = counter.get_total_flops()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    return {"clips_per_s": batch / dt, "step_s": dt, "gflops": flops / dt / 1e9}


def end_to_end(dataset: Path | None, steps: int) -> dict:
    """The quickstart recipe through train(): clips/s and data-wait share over the timed steps (after a warm-up
    of 10 steps, which covers the worker start and DeepSpeed's first-step work)."""
    from launch.cmd_train import CONFIGS
    from pipeline.train import train
    from pipeline.train_config import load_train_config

    with tempfile.TemporaryDirectory() as tmp:
        if dataset is None:
            dataset = build_small_dataset(Path(tmp) / "data")
        cfg = load_train_config(
            CONFIGS / "quickstart.yaml",
            [
                f"data.datasets=[{{path: {dataset}}}]",
                f"run.runs_dir={tmp}/runs",
                f"run.steps={steps + 10}",
                "run.log_every=10",
                f"run.ckpt_every={steps + 10}",
                "optim.warmup_steps=0",
                "run.tensorboard=false",
                "run.device=auto",
            ],
        )
        summary = train(cfg)
        windows = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    timed = windows[1:]  # every 10-step window after the first
    step_s = sum(w["step_s"] for w in timed) / len(timed)
    wait_s = sum(w["data_wait_frac"] * w["step_s"] for w in timed) / len(timed)
    return {"clips_per_s": cfg.run.batch_size / step_s, "step_s": step_s, "data_wait_frac": wait_s / step_s}


def build_small_dataset(out: Path) -> Path:
    from data_prep.build import build_dataset
    from data_prep.synth import make_synth_corpus
    from data_prep.tokenizer import train_tokenizer

    make_synth_corpus(out / "synth", videos=24, seed=0, seconds=10.0, width=128, height=96, fps=20, workers=2)
    build_dataset(out / "synth", out / "train", fps=10, short_side=64, samples_per_shard=8, workers=2)
    train_tokenizer(out / "train", vocab_size=256)
    return out / "train"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per setting")
    parser.add_argument("--dataset", type=Path, default=None, help="built dataset for the end-to-end part")
    parser.add_argument("--e2e-steps", type=int, default=60, help="timed end-to-end steps (multiple of 10)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dist_info = init_distributed("auto")  # the GPU when there is one, else the CPU
    dev = dist_info.device
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    results: dict = {"device": name, "load_average_1min": os.getloadavg()[0]}

    ceiling = matmul_ceiling(dev, n=8192 if dev.type == "cuda" else 1024)
    results["matmul_gflops"] = ceiling
    print(f"{name}, load {os.getloadavg()[0]:.1f}; fp32 matmul ceiling {ceiling:.1f} GFLOP/s")
    print(f"{'setting':<40}{'clips/s':>9}{'step s':>9}{'GFLOP/s':>9}{'/ceiling':>10}")
    for setting, (variant, frames, size, batch) in SETTINGS.items():
        r = model_throughput(variant, frames, size, batch, args.steps, dist_info)
        r["ratio_to_matmul"] = r["gflops"] / ceiling
        results[setting] = r
        print(
            f"{setting:<40}{r['clips_per_s']:>9.2f}{r['step_s']:>9.2f}{r['gflops']:>9.1f}{r['ratio_to_matmul']:>10.3f}"
        )

    e2e = end_to_end(args.dataset, args.e2e_steps)
    results["end_to_end_quickstart"] = e2e
    print(
        f"end to end, quickstart recipe on real shards: {e2e['clips_per_s']:.2f} clips/s, "
        f"{100 * e2e['data_wait_frac']:.1f}% of step time waiting for data"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()

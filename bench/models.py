"""Encoder training speed as a fraction of the machine's own matmul ceiling, measured in the same run.

CPU: forward+backward+SGD clips/s of S3D-G and R(2+1)D-18 at 16x112^2, fp32 and bf16 autocast; achieved GFLOP/s
(model FLOPs from FlopCounterMode, 2 per multiply-add, forward + backward) divided by a large `torch.mm` in fp32
and in bf16. Targets: >= 0.35 of the fp32 matmul in fp32, >= 0.20 of the bf16 matmul under bf16 autocast.
GPU (only with CUDA): 32x224^2, channels_last_3d + torch.compile + bf16 autocast; MFU against the measured bf16
matmul and against the H100 SXM dense bf16 peak (989.4 TFLOP/s).

    .venv/bin/python bench/models.py [--batch 4] [--steps 3] [--models s3d r2plus1d_18]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: spinning threads hurt shared CPUs

import argparse  # noqa: E402
import contextlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import build_encoder  # noqa: E402
from models.flops import count_flops  # noqa: E402

H100_BF16_PEAK = 989.4e12


def matmul_gflops(dtype: torch.dtype, device: str, n: int = 2048, reps: int = 10) -> tuple[float, float]:
    """GFLOP per wall second and per process-CPU second of an n^3 matmul (medians), the models' ceiling."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    wall, cpu = _median_times(lambda: a @ b, reps, warmup=2, device=device)
    return 2 * n**3 / wall / 1e9, 2 * n**3 / cpu / 1e9


def _median_times(fn, reps: int, *, warmup: int, device: str) -> tuple[float, float]:
    """Median wall and process-CPU seconds of `fn()`; CPU time stays meaningful when others share the cores."""
    walls, cpus = [], []
    for _ in range(warmup + reps):
        _sync(device)
        t, c = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return sorted(walls[warmup:])[reps // 2], sorted(cpus[warmup:])[reps // 2]


def train_flops_per_clip(name: str, frames: int, size: int) -> float:
    """Forward + backward FLOPs of one clip (counted on the meta device)."""
    with torch.device("meta"):
        model = build_encoder(name)
        x = torch.zeros(1, 3, frames, size, size)
    return count_flops(model, x, backward=True)


def clips_per_second(
    name: str, *, batch: int, steps: int, frames: int, size: int, device: str, bf16: bool, compile_: bool = False
) -> tuple[float, float]:
    """Training clips per wall second and per process-CPU second: SGD steps on random clips after warm-up."""
    model = build_encoder(name).to(device)
    x = torch.rand(batch, 3, frames, size, size, device=device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.to(memory_format=torch.channels_last_3d)
    step_model = torch.compile(model) if compile_ else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step():
        with autocast:
            loss = step_model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    wall, cpu = _median_times(step, steps, warmup=3 if compile_ else 1, device=device)
    return batch / wall, batch / cpu


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_cpu(args) -> None:
    # Without AVX512-BF16/AMX, oneDNN has no bf16 convolution and PyTorch falls back to slow_conv3d (10-30x slower).
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    mm32, mm32_cpu = matmul_gflops(torch.float32, "cpu")
    n16 = 2048 if native_bf16 else 1024  # the fallback bf16 GEMM is slow: a smaller one is enough to show it
    mm16, mm16_cpu = matmul_gflops(torch.bfloat16, "cpu", n=n16, reps=10 if native_bf16 else 3)
    print(
        f"CPU ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, native bf16: "
        f"{native_bf16}), {args.frames}x{args.size}^2, batch {args.batch}"
    )
    print(
        f"  matmul GFLOP/s (wall | per CPU-s): fp32 2048^3 {mm32:.0f} | {mm32_cpu:.0f}, "
        f"bf16 {n16}^3 {mm16:.0f} | {mm16_cpu:.0f}"
    )
    print(
        f"  {'model':<12} {'dtype':<5} {'clips/s':>8} {'GFLOP/s':>8} {'ratio':>6} {'GFLOP/CPU-s':>12} {'ratio':>6}  "
        "target (ratio = model / same-dtype matmul)"
    )
    for name in args.models:
        flops = train_flops_per_clip(name, args.frames, args.size)
        for bf16 in (False, True):
            if bf16 and not native_bf16 and not args.force_bf16:
                print(f"  {name:<12} bf16  skipped: this CPU has no native bf16 convolution (--force-bf16 runs it)")
                continue
            rate, rate_cpu = clips_per_second(
                name, batch=args.batch, steps=args.steps, frames=args.frames, size=args.size, device="cpu", bf16=bf16
            )
            achieved, achieved_cpu = rate * flops / 1e9, rate_cpu * flops / 1e9
            ceiling, ceiling_cpu = (mm16, mm16_cpu) if bf16 else (mm32, mm32_cpu)
            print(
                f"  {name:<12} {'bf16' if bf16 else 'fp32':<5} {rate:8.2f} {achieved:8.1f} {achieved / ceiling:6.2f} "
                f"{achieved_cpu:12.1f} {achieved_cpu / ceiling_cpu:6.2f}  {'>= 0.20' if bf16 else '>= 0.35'}"
            )
        print(f"  ({name}: {flops / 1e9:.2f} GFLOP per training clip, forward + backward)")


def run_gpu(args) -> None:
    frames, size = 32, 224
    mm16, _ = matmul_gflops(torch.bfloat16, "cuda", n=8192)
    print(f"GPU {torch.cuda.get_device_name()}, {frames}x{size}^2, batch {args.gpu_batch}, channels_last_3d + compile")
    print(f"  matmul 8192^3 bf16: {mm16 / 1e3:.0f} TFLOP/s")
    for name in args.models:
        flops = train_flops_per_clip(name, frames, size)
        rate, _ = clips_per_second(
            name,
            batch=args.gpu_batch,
            steps=args.steps,
            frames=frames,
            size=size,
            device="cuda",
            bf16=True,
            compile_=True,
        )
        achieved = rate * flops
        print(
            f"  {name:<12} bf16 {rate:8.1f} clips/s  {achieved / 1e12:6.1f} TFLOP/s  "
            f"MFU {achieved / H100_BF16_PEAK:.2f} of 989 TFLOP/s, {achieved / (mm16 * 1e9):.2f} of measured mm"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["s3d", "r2plus1d_18"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--gpu-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--force-bf16", action="store_true", help="time bf16 even without native CPU support")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # rows appear as they are measured, also when piped
    start = time.perf_counter()
    run_cpu(args)
    if torch.cuda.is_available():
        run_gpu(args)
    else:
        print("GPU: no CUDA device, section skipped")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

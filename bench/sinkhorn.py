"""Sinkhorn-Knopp speed and memory: seconds (wall and CPU), peak memory ÷ the N x K matrix, the iteration's effective
memory bandwidth ÷ this machine's copy and GEMV bandwidth, (prep + argmax) ÷ 100 iterations, and the fused one-pass
iteration ÷ the two-GEMV iteration it replaced, all measured in the same run.

    .venv/bin/python bench/sinkhorn.py                       # 100k x 300 and 100k x 1000 (3 heads, 100 iterations)
    .venv/bin/python bench/sinkhorn.py --cases 1000000x1000  # the 1M case (3.7 GiB per head buffer)
    .venv/bin/python bench/sinkhorn.py --cases 1000000x1000 --stop-rule  # every head stops by SeLaVi's rule

Each case runs in its own subprocess so its peak RSS (VmHWM after a reset, minus the RSS before the buffer is
allocated) is its own. Every head reuses one float32 buffer: scores are written into it, then solved in place
(`sinkhorn(..., inplace=True)`), one head at a time. Iterations are fixed (tol=0) so cases compare, unless
--stop-rule; the 100k cases also report how many iterations SeLaVi's stopping rule (err <= 0.1) took, over-relaxed
(the default) / plain (relax=1). With --stop-rule every head is solved both ways in the same process, and the run
prints relaxed ÷ plain for seconds, iterations and time per iteration, and how many labels agree. "÷2gemv" is
the fused iteration's time ÷ the previous implementation's (two full-matrix GEMVs, `beta @ P` then `P @ alpha`),
timed on the last head's P in the same process. A CUDA case (1M x 3000) runs only when CUDA exists.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.losses.sinkhorn import sinkhorn  # noqa: E402

GIB = 1 << 30


def copy_bandwidth(device: str) -> dict[str, float]:
    """GB/s of a tensor copy (read + write) and of a GEMV (read-only), the two ceilings for the SK iteration."""
    n = (512 << 20) // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    mat = src.view(-1, 1024)
    vec = torch.rand(1024, device=device)
    best_copy = best_gemv = float("inf")
    for _ in range(5):
        t = _sync_now(device)
        dst.copy_(src)
        best_copy = min(best_copy, _sync_now(device) - t)
        t = _sync_now(device)
        mat @ vec
        best_gemv = min(best_gemv, _sync_now(device) - t)
    return {"copy_gbs": 2 * src.numel() * 4 / best_copy / 1e9, "gemv_gbs": src.numel() * 4 / best_gemv / 1e9}


def _sync_now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def fill_scores_(buf: torch.Tensor, seed: int) -> None:
    """Log-softmax of random logits, written in row chunks so no N x K temporary exists."""
    g = torch.Generator(device=buf.device).manual_seed(seed)
    for rows in buf.split(8192):
        rows.normal_(generator=g).mul_(2.0)
        rows.sub_(rows.logsumexp(dim=1, keepdim=True))


def solve_heads(buf: torch.Tensor, heads: int, **options) -> dict:
    """Every head solved in the one buffer (scores written, then solved in place): summed phase seconds,
    iterations, CPU seconds, the fewest clusters any head used, and each head's labels."""
    out = {"prep": 0.0, "iterate": 0.0, "argmax": 0.0, "iterations": 0, "cpu_seconds": 0.0, "labels": [], "relax": []}
    for h in range(heads):
        fill_scores_(buf, seed=h)
        cpu = time.process_time()
        res = sinkhorn(buf, 20.0, inplace=True, **options)
        out["cpu_seconds"] += time.process_time() - cpu
        for key in ("prep", "iterate", "argmax"):
            out[key] += res.seconds[key]
        out["iterations"] += res.iterations
        out["labels"].append(res.labels)
        out["relax"].append(res.relax)
    out["seconds"] = out["prep"] + out["iterate"] + out["argmax"]
    out["clusters_used_min"] = min(
        int(torch.bincount(lab, minlength=buf.shape[1]).gt(0).sum()) for lab in out["labels"]
    )
    return out


def run_case(n: int, k: int, heads: int, iters: int, device: str, stop_rule: bool, all_stop_rule: bool) -> dict:
    """all_stop_rule: every head runs to SeLaVi's stopping rule, over-relaxed (the default) and then plain
    (relax=1), in this order; otherwise every head runs `iters` iterations (and, if stop_rule, head 0 also runs to
    the rule both ways, for its iteration counts)."""
    _reset_peak_rss()  # importing torch peaks higher than it settles; count only this case
    rss_before = _rss_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    buf = torch.empty(n, k, dtype=torch.float32, device=device)
    matrix = buf.numel() * 4
    main = solve_heads(buf, heads, **({} if all_stop_rule else {"max_iters": iters, "tol": 0.0}))
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / matrix
    else:
        peak = (_peak_rss_bytes() - rss_before) / matrix
    out = {
        "n": n,
        "k": k,
        "heads": heads,
        "matrix_gib": matrix / GIB,
        "peak_over_matrix": peak,
        **{key: v for key, v in main.items() if key != "labels"},
    }
    used_iters = main["iterations"]
    out["eff_gbs"] = 2 * matrix * used_iters / main["iterate"] / 1e9
    out["overhead_over_100"] = (main["prep"] + main["argmax"]) / (main["iterate"] / used_iters * 100 * heads)
    out["fused_over_two_gemv"] = main["iterate"] / used_iters / _two_gemv_seconds(buf, device)
    if all_stop_rule:
        plain = solve_heads(buf, heads, relax=1.0)
        out["plain_seconds"], out["plain_iterations"] = plain["seconds"], plain["iterations"]
        out["iteration_time_over_plain"] = (main["iterate"] / used_iters) / (plain["iterate"] / plain["iterations"])
        out["labels_agree_with_plain"] = min(
            float((a == b).double().mean()) for a, b in zip(main["labels"], plain["labels"])
        )
    elif stop_rule:
        out["stop_rule_iterations"] = [solve_heads(buf, 1, relax=w)["iterations"] for w in (None, 1.0)]
    return out


def _two_gemv_seconds(p: torch.Tensor, device: str, iters: int = 5) -> float:
    """Best seconds of one iteration as the previous implementation ran it: two GEMVs over the whole matrix."""
    beta = torch.full((p.shape[0],), 1.0 / p.shape[0], device=device)
    r = torch.full((p.shape[1],), 1.0 / p.shape[1], device=device)
    best = float("inf")
    for _ in range(iters):
        t = _sync_now(device)
        alpha = r / (beta @ p)
        beta = (1.0 / p.shape[0]) / (p @ alpha)
        best = min(best, _sync_now(device) - t)
    return best


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS that getrusage reports (Linux)
        f.write("5")


def _peak_rss_bytes() -> int:
    """Peak RSS since `_reset_peak_rss` (VmHWM). getrusage's ru_maxrss is not used: after fork + exec it also keeps
    the parent's RSS at fork time (the kernel's signal->maxrss), which clear_refs does not reset."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=["100000x300", "100000x1000"], help="NxK on the CPU")
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stop-rule", action="store_true", help="every head stops by SeLaVi's rule, not --iters")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case in this process, print JSON
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        n, k = (int(v) for v in args.one.split("x"))
        stop_rule = n <= 200_000 and not args.stop_rule
        print(json.dumps(run_case(n, k, args.heads, args.iters, args.device, stop_rule, args.stop_rule)))
        return

    bw = {"cpu": copy_bandwidth("cpu")}
    cases = [(c, "cpu") for c in args.cases]
    if torch.cuda.is_available():
        bw["cuda"] = copy_bandwidth("cuda")
        cases.append(("1000000x3000", "cuda"))
    load = os.getloadavg()[0]
    print(f"load average {load:.1f} on {os.cpu_count()} cores, torch threads {args.threads}", file=sys.stderr)
    print(
        "case              dev   s total  s cpu  prep  iter  argmax  iters  GB/s  ÷copy ÷gemv  ÷2gemv  "
        "(prep+argmax)÷100it  peak÷matrix  stop-rule iters relaxed/plain"
    )
    for case, device in cases:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            case,
            "--device",
            device,
            "--heads",
            str(args.heads),
            "--iters",
            str(args.iters),
            "--threads",
            str(args.threads),
            *(["--stop-rule"] if args.stop_rule else []),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            print(f"{case:<17} {device:<5} FAILED: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        b = bw[device]
        name = f"{case} x{r['heads']}"
        print(
            f"{name:<17} {device:<5} {r['seconds']:7.2f} {r['cpu_seconds']:6.1f} {r['prep']:5.2f} {r['iterate']:5.2f} "
            f"{r['argmax']:6.2f} {r['iterations']:6d} {r['eff_gbs']:5.1f} {r['eff_gbs'] / b['copy_gbs']:6.2f} "
            f"{r['eff_gbs'] / b['gemv_gbs']:5.2f} {r['fused_over_two_gemv']:7.2f}  {r['overhead_over_100']:19.2f}  "
            f"{r['peak_over_matrix']:11.2f}  {'/'.join(map(str, r.get('stop_rule_iterations', ['-'])))}"
        )
        if "plain_seconds" in r:
            print(
                f"  relax {', '.join(f'{w:.2f}' for w in r['relax'])} per head; plain (relax=1): "
                f"{r['plain_seconds']:.2f} s, {r['plain_iterations']} iterations; relaxed ÷ plain: seconds "
                f"{r['seconds'] / r['plain_seconds']:.2f}, iterations {r['iterations'] / r['plain_iterations']:.2f}, "
                f"time per iteration {r['iteration_time_over_plain']:.2f}; "
                f"labels agree {r['labels_agree_with_plain']:.6f} (worst head)"
            )
    print(f"load average {os.getloadavg()[0]:.1f} at the end", file=sys.stderr)
    for device, b in bw.items():
        print(f"{device}: copy {b['copy_gbs']:.1f} GB/s (read+write), GEMV {b['gemv_gbs']:.1f} GB/s (read)")


if __name__ == "__main__":
    main()

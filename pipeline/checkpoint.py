"""Run directories and checkpoints: what survives a restart, written so that a crash never leaves a bad `latest`.

```
<runs>/<name>/config.yaml            resolved config of the latest (re)start
<runs>/<name>/launches.jsonl         one line per (re)start: time, world size, resumed tag, package versions
<runs>/<name>/metrics.jsonl, tb/     written by the training loop
<runs>/<name>/checkpoints/<tag>/     DeepSpeed files + vatp_rank<r>.pt (loader/RNG state) + vatp_meta.json
<runs>/<name>/checkpoints/latest     the tag of the newest *complete* checkpoint
<runs>/<name>/export/                `vatp export`: fp32 safetensors + model config
```

A checkpoint is complete once every rank wrote its files and rank 0 wrote `vatp_meta.json`; only
then does `latest` move (an atomic rename). A run killed while saving resumes from the previous tag.
"""

from __future__ import annotations

import json
import logging
import pickle
import platform
import shutil
import signal
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from pipeline.config import load_yaml
from pipeline.dataset import TOKENIZER_NAME, tokenizer_path
from pipeline.distributed import barrier
from pipeline.files import write_text_atomic

log = logging.getLogger(__name__)

META = "vatp_meta.json"
LATEST = "latest"
CLIENT_KEY = "vatp"  # DeepSpeed mixes its own keys into client_state; ours live under this one


def prepare_run_dir(runs_dir: str | Path, name: str, *, resume: bool) -> Path:
    """Return `<runs_dir>/<name>`, refusing to reuse a started run unless resuming (and to resume nothing).

    A run that stopped before its first checkpoint holds nothing to resume or to lose: it is started over (its
    metrics and TensorBoard files of the failed start are removed), so the same command works again.
    """
    run_dir = Path(runs_dir) / name
    started = (run_dir / "config.yaml").exists() or (run_dir / "checkpoints").exists()
    if resume and latest_tag(run_dir) is None:
        raise ValueError(f"--resume: no complete checkpoint under {run_dir}/checkpoints (nothing to resume)")
    if started and not resume and not _has_checkpoint_files(run_dir):
        log.warning("%s holds a run that stopped before its first checkpoint: starting it over", run_dir)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tb", ignore_errors=True)
        return run_dir
    if started and not resume:
        raise ValueError(
            f"run directory {run_dir} already holds a run: pass --resume to continue it, "
            f"or choose another run.name (e.g. --set run.name={name}-2)"
        )
    return run_dir


def _has_checkpoint_files(run_dir: Path) -> bool:
    ckpt_dir = run_dir / "checkpoints"
    return ckpt_dir.is_dir() and any(ckpt_dir.iterdir())


def check_same_model(run_dir: Path, model: dict) -> None:
    """Resuming must build the model the checkpoint holds: compare `model` (a recipe's `model` mapping) with the
    run's saved config.yaml and name the first differences, instead of failing later on state-dict keys."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    saved = load_yaml(path).get("model") or {}
    model = json.loads(json.dumps(model))  # tuples -> lists, as YAML reads them back
    diff = sorted(k for k in set(saved) | set(model) if saved.get(k) != model.get(k))
    if diff:
        shown = "; ".join(f"model.{k} is {saved.get(k)!r} there and {model.get(k)!r} here" for k in diff[:4])
        raise ValueError(
            f"cannot resume {run_dir} with another model: {shown}. Resume with the run's own config "
            f"(`vatp train {run_dir} --resume`) or choose another run.name"
        )


def package_versions() -> dict[str, str]:
    """Versions worth knowing when a run is compared or reproduced later."""
    import numpy

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    versions["cuda"] = torch.version.cuda or "none"
    from importlib.metadata import PackageNotFoundError, version

    for name in ("deepspeed", "webdataset", "faiss-cpu", "av", "decord", "sentencepiece", "imageio-ffmpeg", "vatp"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:  # a missing distribution is reported, not fatal
            versions[name] = "unknown"
    return versions


def environment() -> dict:
    """What decides whether a run's numbers reproduce bit for bit: the CPU (its vector instructions pick torch's
    and FAISS's kernels, whose float sums round differently), the thread count, and the library versions (the
    ffmpeg binary encodes the shards, PyAV and decord decode them)."""
    return {
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "versions": package_versions(),
        "ffmpeg": _ffmpeg_version(),
    }


def _ffmpeg_version() -> str:
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_version()
    except Exception:  # noqa: BLE001 - reported, not fatal: the binary is only needed by the data build
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def record_launch(run_dir: Path, *, world_size: int, resumed_from: str | None) -> None:
    """Append this (re)start to `launches.jsonl` (rank 0 only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    line = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "world_size": world_size,
        "resumed_from": resumed_from,
        **environment(),
    }
    with open(run_dir / "launches.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def latest_tag(run_dir: str | Path) -> str | None:
    """The tag `checkpoints/latest` names, or None when there is no complete checkpoint yet."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text(encoding="utf-8").strip()
    if not tag or not (ckpt_dir / tag / META).is_file():
        raise ValueError(f"{latest} names {tag!r}, which is not a complete checkpoint (missing {META})")
    return tag


def checkpoint_problem(tag_dir: Path) -> str | None:
    """What is wrong with a saved checkpoint's files, or None: every `.pt` file must be a readable archive (a
    truncated or overwritten file has no zip central directory). Opening the archive reads its index only."""
    if not (tag_dir / META).is_file():
        return f"{tag_dir} is not a complete checkpoint (missing {META})"
    files = sorted(tag_dir.glob("*.pt"))
    if not files:
        return f"{tag_dir} holds no .pt files"
    for path in files:
        try:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return f"{path} is damaged ({e})"
    return None


def usable_tag(run_dir: str | Path, *, fall_back: bool) -> str:
    """The checkpoint to load: `latest` when its files are whole. With `fall_back`, a damaged `latest` gives way
    to the newest earlier whole checkpoint, with a warning naming the damaged one; otherwise it is a ValueError
    naming the damaged file."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = latest_tag(run_dir)
    if tag is None:
        raise ValueError(f"no complete checkpoint under {ckpt_dir}")
    problem = checkpoint_problem(ckpt_dir / tag)
    if problem is None:
        return tag
    if not fall_back:
        raise ValueError(problem)
    older = sorted(
        (p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name < tag),
        reverse=True,
    )
    for candidate in older:
        if checkpoint_problem(ckpt_dir / candidate) is None:
            log.warning("%s; resuming from the newest whole checkpoint before it, %s", problem, candidate)
            return candidate
    raise ValueError(f"{problem}, and no earlier checkpoint under {ckpt_dir} is whole: nothing to resume")


def _refused(tag_dir: Path, e: Exception) -> str:
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return f"{tag_dir}: refused to load it: it holds objects other than tensors and plain data ({first})"


def save_checkpoint(
    engine: Any,
    run_dir: Path,
    *,
    step: int,
    client_state: dict,
    rank_state: dict,
    keep: int,
    rank: int,
    world_size: int,
) -> str:
    """Save engine + optimizer + scheduler (DeepSpeed), `client_state` (rank 0's copy) and every rank's
    `rank_state`; then mark the tag complete and point `latest` at it. Every rank must call this."""
    ckpt_dir = run_dir / "checkpoints"
    tag = f"step_{step:08d}"
    if (ckpt_dir / tag / META).is_file():
        return tag  # this step is saved already (a signal inside an accumulation cycle); never rewrite `latest`
    if rank == 0 and (ckpt_dir / tag).exists():
        shutil.rmtree(ckpt_dir / tag)  # leftovers of a save that was killed: never complete, never latest
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={CLIENT_KEY: client_state}, save_latest=False)
    torch.save(rank_state, ckpt_dir / tag / f"vatp_rank{rank:05d}.pt")
    barrier()
    if rank == 0:
        meta = {"step": step, "world_size": world_size, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_text_atomic(ckpt_dir / tag / META, json.dumps(meta) + "\n", fsync=True)
        write_text_atomic(ckpt_dir / LATEST, tag + "\n", fsync=True)
        _prune(ckpt_dir, keep=keep, current=tag)
    barrier()
    return tag


def load_checkpoint(engine: Any, run_dir: Path, *, rank: int, world_size: int) -> tuple[str, dict, dict]:
    """Load `latest` (or, when its files are damaged, the newest whole checkpoint before it: `usable_tag`) into
    `engine` (weights, optimizer, scheduler) and return `(tag, client_state, rank_state)`."""
    tag = usable_tag(run_dir, fall_back=True)
    ckpt_dir = run_dir / "checkpoints"
    meta = json.loads((ckpt_dir / tag / META).read_text(encoding="utf-8"))
    if meta["world_size"] != world_size:
        raise ValueError(
            f"{ckpt_dir / tag} was saved by {meta['world_size']} ranks, this run has {world_size}: convert it with "
            f"`python -m deepspeed.checkpoint.ds_to_universal` (docs/training.md) or launch {meta['world_size']} ranks"
        )
    try:
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        rank_state = torch.load(ckpt_dir / tag / f"vatp_rank{rank:05d}.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused something no checkpoint of ours contains
        raise ValueError(_refused(ckpt_dir / tag, e)) from None
    if path is None:
        raise ValueError(f"DeepSpeed could not load {ckpt_dir / tag}")
    return tag, client_state[CLIENT_KEY], rank_state


class StopRequest:
    """Turns SIGTERM / SIGUSR1 (SLURM pre-emption, `scancel --signal`) into a flag the loop polls between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _prune(ckpt_dir: Path, *, keep: int, current: str) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and any incomplete leftovers."""
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_"))
    complete = [t for t in tags if (ckpt_dir / t / META).is_file()]
    doomed = set(complete[:-keep]) | {t for t in tags if t not in complete and t < current}
    for t in sorted(doomed - {current}):
        shutil.rmtree(ckpt_dir / t, ignore_errors=True)
        log.debug("removed old checkpoint %s", t)


def export_run(run_dir: str | Path, *, tag: str | None = None, out_dir: str | Path | None = None) -> Path:
    """Write `<out_dir or run_dir/export>/{model.safetensors, model.yaml}` (fp32) from checkpoint `tag` (default
    `latest`), plus the run's tokenizer when the model has a text tower. Needs no process group."""
    from models.towers import build_model, save_exported
    from pipeline.config import load_yaml
    from pipeline.engine import fp32_state_dict
    from pipeline.train_config import train_config_from_dict

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = train_config_from_dict(load_yaml(run_dir / "config.yaml"), where=str(run_dir / "config.yaml"))
    tag = tag or latest_tag(run_dir)
    if tag is None or not (run_dir / "checkpoints" / tag / META).is_file():
        raise ValueError(f"{run_dir}: no complete checkpoint {tag or '(latest)'} to export")
    problem = checkpoint_problem(run_dir / "checkpoints" / tag)
    if problem is not None:
        raise ValueError(f"{problem}: export an earlier checkpoint with --tag, or resume the run to save a new one")
    model = build_model(cfg.model)
    try:
        weights = fp32_state_dict(run_dir / "checkpoints", tag)
    except pickle.UnpicklingError as e:
        raise ValueError(_refused(run_dir / "checkpoints" / tag, e)) from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{run_dir}/checkpoints/{tag} does not match config.yaml: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    out = Path(out_dir) if out_dir is not None else run_dir / "export"
    save_exported(model, cfg.model, out)
    if cfg.model.text is not None:
        tokenizer = tokenizer_path([d.path for d in cfg.data.datasets], cfg.data.text.tokenizer)
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, out / TOKENIZER_NAME)
    (out / "export.json").write_text(json.dumps({"run": str(run_dir), "tag": tag}) + "\n", encoding="utf-8")
    log.info("exported %s/checkpoints/%s to %s", run_dir, tag, out)
    return out

"""A full or read-only output folder ends `vatp data build` and `vatp embed` with one line and a non-zero exit.

The folders are real tmpfs mounts (1 MB, or read-only) in a private mount namespace (`unshare -m`, as root);
where that is not allowed the tests skip and say why.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VATP = [sys.executable, "-m", "launch.cli"]


@pytest.fixture(scope="module")
def mounted(tmp_path_factory):
    """`mounted(folder, options, argv)`: run `argv` with a fresh tmpfs mounted at `folder` (e.g. "size=1m", "ro")."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a private tmpfs")

    def run(folder: Path, options: str, argv: list[str]) -> subprocess.CompletedProcess:
        folder.mkdir(parents=True, exist_ok=True)
        inner = f'mount -t tmpfs -o {options} tmpfs "{folder}" && exec "$@"'
        cmd = ["unshare", "-m", "sh", "-c", inner, "sh", *argv]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)

    probe = run(tmp_path_factory.mktemp("probe") / "m", "size=1m", ["true"])
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs here: {probe.stderr.strip()[-200:]}")
    return run


def _last_line(done: subprocess.CompletedProcess) -> str:
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("options, reason", [("size=64k", "No space left on device"), ("ro", "Read-only file system")])
def test_build_into_a_full_or_read_only_folder_ends_with_one_line(synth_corpus, tmp_path, mounted, options, reason):
    out = tmp_path / "out"
    argv = VATP + ["data", "build", str(synth_corpus), "--out", str(out / "ds"), "--workers", "1"]
    done = mounted(out, options, argv)
    assert done.returncode == 1, done.stderr[-2000:]
    assert _last_line(done).startswith(f"vatp data build: error: {reason}: {out}")
    assert "Traceback" not in done.stderr


def test_embed_into_a_read_only_folder_ends_with_one_line(export_tiny_model, tmp_path, mounted):
    from models.towers import SpaceConfig

    space = SpaceConfig("vt", ["video", "text"], dim=8)
    export, data = export_tiny_model("rofs", video="s3d_tiny", text="text_tiny", spaces=[space])
    out = tmp_path / "out"
    argv = VATP + ["embed", "--checkpoint", str(export), "--data", str(data), "--out", str(out / "emb")]
    done = mounted(out, "ro", argv + ["--set", "workers=0"])
    assert done.returncode == 1, done.stderr[-2000:]
    assert _last_line(done).startswith(f"vatp embed: error: Read-only file system: {out}")

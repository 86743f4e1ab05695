"""What a user meets when an install is incomplete or a conversion was interrupted.

Both tests use the real thing: a venv made by uv from the lock without the torch extra (what
`pip install modelfleet` gives), and a weight conversion killed with SIGKILL mid-way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("MODELFLEET_CACHE", Path.home() / ".cache" / "modelfleet"))
UV = CACHE / "uvtool" / "bin" / "uv"
MANIFEST = ROOT / "examples" / "smollm2-local.yaml"


@pytest.mark.slow
def test_up_without_the_torch_extra_names_the_extra(tmp_path: Path) -> None:
    assert UV.is_file(), f"{UV} is missing: run scripts/bootstrap.sh"
    venv = tmp_path / "bare"
    subprocess.run([str(UV), "venv", "--quiet", "--python", "python3.11", str(venv)], check=True, timeout=120)
    env = {**os.environ, "VIRTUAL_ENV": str(venv)}
    # the base install at the locked versions, then the project itself: no extra
    base = subprocess.run(
        [str(UV), "export", "--frozen", "--no-emit-project", "--no-header", "--no-annotate"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    (tmp_path / "base.txt").write_text(base)
    subprocess.run([str(UV), "pip", "install", "--quiet", "--require-hashes", "-r", str(tmp_path / "base.txt")],
                   env=env, check=True, timeout=600)  # fmt: skip
    subprocess.run([str(UV), "pip", "install", "--quiet", "--no-deps", str(ROOT)], env=env, check=True, timeout=600)
    up = subprocess.run(
        [str(venv / "bin" / "modelfleet"), "up", "-f", str(MANIFEST), "--port", "8181"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert up.returncode == 1, up.stdout + up.stderr
    assert "Traceback" not in up.stderr
    assert "deployment smollm2: runtime torch needs the torch extra" in up.stderr
    assert "pip install 'modelfleet[torch]'" in up.stderr
    assert "missing: torch, transformers" in up.stderr


@pytest.mark.model
@pytest.mark.slow
def test_an_interrupted_conversion_is_cleaned_up_on_the_next_start(tmp_path: Path) -> None:
    env = {**os.environ, "MODELFLEET_CACHE": str(tmp_path)}
    convert = (
        "from modelfleet.dataplane.manifest import load_manifests\n"
        "from modelfleet.dataplane.runners.weights import resolve_hf_dir\n"
        "from pathlib import Path\n"
        f"spec = load_manifests(Path({str(MANIFEST)!r}))[0].spec\n"
        "print(resolve_hf_dir(spec.model.source), flush=True)\n"
    )
    weights = tmp_path / "weights"
    proc = subprocess.Popen([sys.executable, "-P", "-c", convert], env=env)
    deadline = time.monotonic() + 120
    partial: list[Path] = []
    while not partial:  # the conversion's temporary folder appears, then the process dies mid-way
        assert proc.poll() is None, "the conversion ended before it could be interrupted"
        assert time.monotonic() < deadline, "no temporary folder appeared within 120 s"
        partial = [p for p in weights.glob(".*-*") if p.is_dir()] if weights.is_dir() else []
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert all(p.exists() for p in partial), "SIGKILL leaves the folder behind: that is the case under test"

    done = subprocess.run([sys.executable, "-P", "-c", convert], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    target = Path(done.stdout.strip().splitlines()[-1])
    assert (target / ".modelfleet-converted").is_file()
    assert not any(p.exists() for p in partial)
    assert [p for p in weights.iterdir() if p.is_dir()] == [target]

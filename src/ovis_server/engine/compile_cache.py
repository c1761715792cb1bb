"""torch.compile's on-disk caches in the data directory, so a restart reuses what it compiled.

Inductor keeps its modular caches under ``TORCHINDUCTOR_CACHE_DIR``: compiled FX graphs,
AOTAutograd's graphs, autotuning results, the dynamic-shape decisions of earlier runs, and
(on CUDA) Triton's kernels in ``triton/<device>``. They are keyed by the graph, the input
shapes, the torch and Triton versions and the GPU, so a new torch or another GPU misses
rather than loads something wrong; several workers may share the folder (writes are atomic
and locked). Pointing that variable at ``<data_dir>/compile-cache`` before anything compiles
is all it takes; torch's "mega-cache" (``torch.compiler.save_cache_artifacts``) is for
shipping a cache to other machines, which this does not need.

What torch cannot load it recompiles by itself; a cache that breaks compilation altogether
(a damaged kernel library, say) is moved aside by ``discard`` and compilation starts afresh.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "TORCHINDUCTOR_CACHE_DIR"
# Both on by default in recent torch; said explicitly for the older ones we support. An
# operator's own value (0 turns a cache off) is left as it is.
CACHE_SWITCHES = {"TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}


@dataclass(frozen=True)
class CompileCache:
    """Where this process's compile cache is, or None where it could not be set up."""

    directory: Path | None
    note: str  # how it was found, for the log

    def files(self) -> int:
        """Files in the cache (0 without one)."""
        if self.directory is None:
            return 0
        return sum(len(names) for _, _, names in os.walk(self.directory))

    def discard(self) -> None:
        """Move a cache that broke compilation aside, empty, and make torch forget what it
        loaded from it, so that the next compile starts from nothing."""
        reset_compiled()
        if self.directory is None:
            return
        aside = self.directory.with_name(f"{self.directory.name}.broken-{os.getpid()}")
        try:
            self.directory.rename(aside)
        except OSError as exc:
            logger.warning("could not move the compile cache %s aside: %s", self.directory, exc)
            return
        shutil.rmtree(aside, ignore_errors=True)
        try:
            self.directory.mkdir(mode=0o700)
        except OSError as exc:
            logger.warning("could not recreate the compile cache %s: %s", self.directory, exc)


def use_compile_cache(directory: Path) -> CompileCache:
    """Point torch.compile's caches at ``directory`` (made 0700: compiled code is loaded and
    run from it) unless ``TORCHINDUCTOR_CACHE_DIR`` is set already. Call it before anything
    compiles. A folder that cannot be made or written leaves torch's default (a per-user
    folder under /tmp) in place, with a warning."""
    given = os.environ.get(CACHE_DIR_ENV)
    if given:
        return CompileCache(Path(given), f"{CACHE_DIR_ENV} from the environment")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(f"{directory} is not writable")
    except OSError as exc:
        logger.warning(
            "no persistent compile cache (%s): compiling with torch's default cache, which "
            "a restart may not find",
            exc,
        )
        return CompileCache(None, f"unavailable: {exc}")
    os.environ[CACHE_DIR_ENV] = str(directory)
    for name, value in CACHE_SWITCHES.items():
        os.environ.setdefault(name, value)
    _apply_switches()
    return CompileCache(directory, "reused" if any(directory.iterdir()) else "new")


def _apply_switches() -> None:
    """The switches as torch's config reads them, in case torch was imported before the
    environment was set (the environment is read at import)."""
    try:
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config
    except ImportError:  # pragma: no cover - torch is a dependency
        return
    if os.environ.get("TORCHINDUCTOR_FX_GRAPH_CACHE") == "1":
        _set(inductor_config, "fx_graph_cache", True)
    if os.environ.get("TORCHINDUCTOR_AUTOGRAD_CACHE") == "1":
        _set(functorch_config, "enable_autograd_cache", True)


def _set(config: Any, name: str, value: bool) -> None:
    if hasattr(config, name):
        setattr(config, name, value)


def reset_compiled() -> None:
    """Forget every compiled graph of this process (and what was loaded from the cache)."""
    import torch

    torch._dynamo.reset()
    from torch._inductor import utils as inductor_utils

    clear = getattr(inductor_utils, "clear_caches", None) or getattr(
        inductor_utils, "clear_inductor_caches", None
    )
    if clear is not None:
        clear()


def cache_counters() -> dict[str, int]:
    """Hits and misses of the FX graph and AOTAutograd caches in this process so far."""
    from torch._dynamo.utils import counters

    wanted = {
        ("inductor", "fxgraph_cache_hit"): "fx_graph_hits",
        ("inductor", "fxgraph_cache_miss"): "fx_graph_misses",
        ("aot_autograd", "autograd_cache_hit"): "autograd_hits",
        ("aot_autograd", "autograd_cache_miss"): "autograd_misses",
    }
    return {name: int(counters[group][key]) for (group, key), name in wanted.items()}

"""JAX's persistent compilation cache for every way into mlip: CLI, calculator, MD.

A second start of the same model at the same size then loads its compiled programs
instead of compiling them again (seconds on a CPU, minutes on a GPU, issue 20). The
directory is ``$MLIP_COMPILATION_CACHE`` (default ``~/.cache/mlip/xla``); ``off`` turns
the cache off. A directory the user has already given JAX is left as it is.
"""

from __future__ import annotations

import os

DEFAULT_DIRECTORY = os.path.join("~", ".cache", "mlip", "xla")


def enable_compilation_cache() -> None:
    """Point JAX at mlip's cache directory unless switched off or already set."""
    import jax

    directory = os.environ.get("MLIP_COMPILATION_CACHE", os.path.expanduser(DEFAULT_DIRECTORY))
    if not directory or directory.lower() in ("off", "0", "false", "no"):
        return
    if jax.config.jax_compilation_cache_dir:  # the user's (or a test suite's) own choice wins
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    # JAX decides once per process, at its first compilation, whether a cache is in use; a
    # script that compiled something before creating the calculator would keep none.
    try:
        from jax._src import compilation_cache
    except ImportError:  # a JAX without this private module: the setting applies from the next process
        return
    compilation_cache.reset_cache()

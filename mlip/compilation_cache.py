"""Start-up settings for every way into mlip (CLI, calculator, MD): JAX's persistent
compilation cache, and XLA's GPU autotuning off.

A second start of the same model at the same size then loads its compiled programs
instead of compiling them again (seconds on a CPU, minutes on a GPU, issue 20). The
directory is ``$MLIP_COMPILATION_CACHE`` (default ``~/.cache/mlip/xla``); ``off`` turns
the cache off. A directory the user has already given JAX is left as it is.

On a GPU, XLA times candidate kernels for each fusion of a new program (autotuning). For
the default model's MD block at 4000 atoms on an H200 that took over 150 s, against 18 s
of compilation without it (docs/benchmarks.md, "GPU"), and every new system size pays it
again. `gpu_autotuning_off` adds ``--xla_gpu_autotune_level=0`` to ``XLA_FLAGS`` where a
GPU plugin of JAX is installed, unless the user's ``XLA_FLAGS`` already set a level or
``MLIP_GPU_AUTOTUNE=1`` asks for XLA's default. ``import mlip`` runs it; XLA reads the
flags when JAX first starts a backend, so it must come before the first JAX computation
(a warning says so when it came too late).
"""

from __future__ import annotations

import os
import pkgutil
import sys
import warnings

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


AUTOTUNE_OFF = "--xla_gpu_autotune_level=0"


def gpu_autotuning_off() -> bool:
    """Switch XLA's GPU autotuning off (see the module's doc); True if this call did."""
    if os.environ.get("MLIP_GPU_AUTOTUNE", "0").strip().lower() in ("1", "true", "yes", "on"):
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_autotune_level" in flags:  # the user's own level stays
        return False
    # Only where JAX can run on a GPU: on a CPU-only install the flags (and with them the
    # keys of programs already in the compilation cache) stay exactly as they were.
    if not any(module.name.startswith(("jax_cuda", "jax_rocm")) for module in pkgutil.iter_modules()):
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {AUTOTUNE_OFF}".strip()
    if "jax" in sys.modules:
        try:
            from jax._src.xla_bridge import backends_are_initialized
        except ImportError:  # a JAX without it: nothing to tell
            return True
        if backends_are_initialized() and sys.modules["jax"].default_backend() != "cpu":
            warnings.warn("mlip was imported after JAX started its backends, so XLA's GPU autotuning stays on "
                          "for this process (minutes of compilation per new system size on a GPU); import mlip "
                          "before the first JAX computation", stacklevel=3)
    return True

"""mlip: machine-learned interatomic potentials on JAX (MACE-class models, ASE calculator)."""

from mlip.compilation_cache import gpu_autotuning_off
from mlip.host_memory import keep_host_memory

__version__ = "0.1.0"

# Before any JAX computation, so XLA's threads allocate under these settings and XLA
# starts its GPU backend with these flags.
keep_host_memory()
gpu_autotuning_off()


def __getattr__(name):
    # Lazy: `import mlip` stays cheap (the CLI's --help does not load JAX).
    if name == "MLIPCalculator":
        from mlip.calculator import MLIPCalculator
        return MLIPCalculator
    raise AttributeError(f"module 'mlip' has no attribute {name!r}")


__all__ = ["MLIPCalculator", "__version__"]

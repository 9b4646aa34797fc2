"""mlip: machine-learned interatomic potentials on JAX (MACE-class models, ASE calculator)."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import mlip` stays cheap (the CLI's --help does not load JAX).
    if name == "MLIPCalculator":
        from mlip.calculator import MLIPCalculator
        return MLIPCalculator
    raise AttributeError(f"module 'mlip' has no attribute {name!r}")


__all__ = ["MLIPCalculator", "__version__"]

"""Active learning: explore with MD, select uncertain structures, label them with an ASE oracle, retrain.

    from mlip.active import ActiveLearner
    ActiveLearner.from_file("configs/active_learning.yaml").run()   # as `mlip active-learn`
"""

__all__ = ["ActiveLearner", "UncertaintyScorer", "load_active_learning_config"]


def __getattr__(name):
    # Lazy, as `mlip` itself: importing the package loads neither the loop nor JAX.
    if name in ("ActiveLearner", "UncertaintyScorer"):
        from mlip.active import learner
        return getattr(learner, name)
    if name == "load_active_learning_config":
        from mlip.active.config import load_active_learning_config
        return load_active_learning_config
    raise AttributeError(f"module 'mlip.active' has no attribute {name!r}")

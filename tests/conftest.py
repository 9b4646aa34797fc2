"""Shared fixtures: float64 on (an entry point), NaN checks, tiny models and tiny data sets."""

import os

# Compile for the tests' sake, not for speed: the suite is mostly XLA compilation of tiny
# models, and LLVM's optimisation passes were a third of it (a cold end-to-end run of the
# transformer: 73 -> 43 s). Results stay within the tests' tolerances; set
# MLIP_TEST_XLA_OPTIMIZE=1 to compile as users do.
if os.environ.get("MLIP_TEST_XLA_OPTIMIZE", "0").lower() in ("0", "false", "no", "off", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                                     "--xla_backend_optimization_level=0",
                                                     "--xla_llvm_disable_expensive_passes=true"]))

import jax  # noqa: E402
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_debug_nans", True)
_cache = os.environ.get("MLIP_TEST_COMPILATION_CACHE", os.path.expanduser("~/.cache/mlip/xla-tests"))
if _cache.lower() != "off":
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

TINY_BACKBONE = dict(num_channels=4, max_ell=2, max_l=1, correlation=2, num_interactions=2,
                     radial_mlp=(8,), r_max=3.0)
TINY_BACKBONES = {"mace": TINY_BACKBONE,
                  "transformer": dict(num_channels=8, num_heads=2, num_layers=2, num_rbf=8, r_max=3.0),
                  "transip": dict(num_channels=8, num_heads=2, head_dim=4, num_layers=2, num_frequencies=4)}


def with_long_range(model, les=True, ewald_mp=True):
    """A `model:` mapping of an end-to-end test with long-range terms added (LES, Ewald message
    passing, and the charge/spin embedding), so an uncertainty method's run also trains and
    predicts through them. Each term costs ~15 s of compilation in a cold end-to-end run:
    the slowest methods' tests take one term each."""
    backbone = {**model["backbone"], "charge_spin_embedding": True}
    if ewald_mp:
        backbone["ewald_message_passing"] = {"k_cutoff": 1.0}
    out = {**model, "backbone": backbone}
    if les:
        out["long_range"] = {"name": "les", "charge_mlp": [4]}
    return out


def make_potential(atomic_numbers, dtype="float64", e0=None, shift=0.0, scale=1.0,
                   avg_num_neighbors=8.0, long_range=None, magmoms=False, backbone_name="mace",
                   all_to_all=None, repulsion=None, **backbone):
    """A tiny potential (MACE, or the backbone named) with fixed statistics and its parameters.

    ``long_range``: a `model.long_range` mapping (e.g. ``{"name": "les"}``) or None;
    ``magmoms``: add the magnetic-moment head; ``all_to_all``, ``repulsion``: `model.all_to_all`
    and `model.repulsion` mappings or None; ``backbone``: settings over the tiny ones.
    """
    from mlip.data.statistics import DatasetStatistics
    from mlip.potential import Potential
    from mlip.training.checkpoint import dummy_graph
    from mlip.training.config import ModelConfig

    settings = {"name": backbone_name, **TINY_BACKBONES[backbone_name], **backbone}
    stats = DatasetStatistics(atomic_numbers=tuple(sorted(atomic_numbers)),
                              e0=e0 or {z: 0.0 for z in atomic_numbers}, shift=shift, scale=scale,
                              avg_num_neighbors=avg_num_neighbors)
    config = ModelConfig.model_validate({"backbone": settings, "dtype": dtype,
                                         "long_range": long_range, "magmoms": magmoms,
                                         "all_to_all": all_to_all, "repulsion": repulsion})
    potential = Potential(config, stats)
    params = jax.jit(potential.init)(jax.random.PRNGKey(0), dummy_graph(stats.atomic_numbers))
    # Random init leaves some paths tiny; scale up so invariance tests see real signal.
    params = jax.tree.map(lambda p: p * 1.5, params)
    return potential, params


def emt_frames(n_frames=12, seed=0, offset=1000.0):
    """Small periodic Cu/Au cells with EMT energy (shifted by ``offset``), forces, stress."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n_frames):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        if k % 2:
            atoms[int(rng.integers(4))].symbol = "Au"
        strain = rng.uniform(-0.03, 0.03, (3, 3))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.5 * (strain + strain.T)), scale_atoms=True)
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress(voigt=False)
        atoms.calc = None
        atoms.info["REF_energy"] = energy + offset
        atoms.arrays["REF_forces"] = forces
        atoms.info["REF_stress"] = stress
        frames.append(atoms)
    return frames


@pytest.fixture(scope="session")
def emt_file(tmp_path_factory):
    import ase.io

    path = tmp_path_factory.mktemp("data") / "cuau.extxyz"
    ase.io.write(path, emt_frames(16))
    return str(path)


@pytest.fixture
def keys():
    def generator():
        key = jax.random.PRNGKey(24)
        while True:
            key, sub = jax.random.split(key)
            yield sub
    return generator()

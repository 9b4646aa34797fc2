"""On-device MD: agreement with ASE's integrators, conservation, thermostat and barostat statistics,
neighbour-list rebuilds, bounded compilation, stability stops, and the `mlip md` command."""

import dataclasses
import json
import re
import os
import subprocess
import sys

import ase.io
import numpy as np
import pytest
from ase import units
from ase.build import bulk, molecule
from conftest import make_potential
from lennard_jones import LennardJonesPotential, argon_crystal, no_params

from mlip.calculator import MLIPCalculator
from mlip.md import MDStabilityError, MolecularDynamics
from mlip.errors import MLIPError
from mlip.md.simulation import maxwell_boltzmann_momenta


@pytest.fixture(scope="module")
def cuau():
    # Small forces (scale) keep a random-weight model's MD tame for a few dozen steps.
    return make_potential([29, 79], r_max=4.0, scale=0.05)


def cuau_cell(repeat=2, seed=1):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(repeat)
    atoms[3].symbol = "Au"
    atoms.rattle(0.05, seed=seed)
    atoms.set_momenta(maxwell_boltzmann_momenta(atoms.get_masses(), 300.0, seed))
    return atoms


def ase_dynamics(name, atoms, dt, temperature_K, pressure_GPa):
    from ase.md.nose_hoover_chain import MTKNPT, IsotropicMTKNPT, NoseHooverChainNVT
    from ase.md.verlet import VelocityVerlet

    if name == "nve":
        return VelocityVerlet(atoms, timestep=dt)
    if name == "nose-hoover":
        return NoseHooverChainNVT(atoms, timestep=dt, temperature_K=temperature_K, tdamp=100 * dt)
    cls = IsotropicMTKNPT if name == "npt" else MTKNPT
    return cls(atoms, timestep=dt, temperature_K=temperature_K, pressure_au=pressure_GPa * units.GPa,
               tdamp=100 * dt, pdamp=1000 * dt)


@pytest.mark.parametrize("ensemble, overlap", [("nve", False), ("nose-hoover", False), ("npt", False),
                                               ("npt-aniso", False), ("nve", True), ("npt-aniso", True)])
def test_on_device_md_matches_ase_step_for_step(cuau, ensemble, overlap):
    potential, params = cuau
    atoms = cuau_cell()
    steps, timestep_fs, temperature, pressure = 12, 2.0, 600.0, 1.0
    # A skin of 0.1 Å forces several rebuilds, so their correctness is checked too; with
    # ``overlap`` the lists are built on the host thread, from positions a block old.
    md = MolecularDynamics(potential, params, atoms, ensemble=ensemble, timestep_fs=timestep_fs,
                           temperature_K=None if ensemble == "nve" else temperature,
                           pressure_GPa=pressure, skin=0.1, max_temperature_K=1e6,
                           overlap_neighbour_lists=overlap)
    md.run(steps)
    assert (md._list_thread is not None) == overlap  # the thread did build lists
    reference = atoms.copy()
    reference.calc = MLIPCalculator(potential, params)
    ase_dynamics(ensemble, reference, timestep_fs * units.fs, temperature, pressure).run(steps)
    result = md.atoms
    assert md.steps_done == steps and md.neighbour_list_builds > 1
    np.testing.assert_allclose(result.positions, reference.positions, atol=1e-9)
    np.testing.assert_allclose(result.get_momenta(), reference.get_momenta(), atol=1e-9)
    np.testing.assert_allclose(result.cell.array, reference.cell.array, atol=1e-9)
    if ensemble.startswith("npt"):
        assert not np.allclose(result.cell.array, atoms.cell.array)  # the barostat did move the cell


def test_nve_conserves_energy_with_float64_model(cuau):
    potential, params = cuau
    # A random-weight model pulls the atoms together and heats them to ~2000 K: a hard
    # test of integration accuracy (not of the model, hence the relaxed distance check).
    md = MolecularDynamics(potential, params, cuau_cell(), ensemble="nve", timestep_fs=0.5, skin=0.5,
                           block_steps=50, max_temperature_K=1e6, min_distance_fraction=0.1)
    md.run(200)
    table = md.thermo_table()
    fluctuation = np.abs(table["conserved_energy"] - table["conserved_energy"][0]).max()
    exchanged = np.ptp(table["potential_energy"])
    assert exchanged / md.n_atoms > 0.05  # eV/atom moved between potential and kinetic energy
    assert fluctuation < 1e-3 * exchanged, (fluctuation, exchanged)  # measured 2.6e-4


def test_nve_error_falls_with_the_square_of_the_time_step():
    fluctuations = []
    for timestep_fs in (8.0, 4.0):
        md = MolecularDynamics(LennardJonesPotential(), no_params(), argon_crystal(), ensemble="nve",
                               timestep_fs=timestep_fs, temperature_K=60.0, seed=4, block_steps=100)
        md.run(int(800 / timestep_fs))
        conserved = md.thermo_table()["conserved_energy"]
        fluctuations.append(np.abs(conserved - conserved[0]).max())
    assert 3.0 < fluctuations[0] / fluctuations[1] < 5.0, fluctuations  # velocity Verlet is second order
    assert fluctuations[1] / md.n_atoms < 1e-5


def test_langevin_reaches_target_temperature():
    md = MolecularDynamics(LennardJonesPotential(), no_params(), argon_crystal(), ensemble="langevin",
                           timestep_fs=5.0, temperature_K=50.0, friction_per_fs=0.02, seed=3,
                           block_steps=100)
    md.run(2500)
    temperature = md.thermo_table()["temperature_K"][500:]
    # 2000 correlated samples of a 108-atom system: the mean lies within ~1 K of the target.
    assert abs(temperature.mean() - 50.0) < 2.0, temperature.mean()
    kinetic = md.thermo_table()["kinetic_energy"][500:]
    canonical_std = np.sqrt(1.5 * md.n_atoms) * units.kB * 50.0
    assert 0.7 < kinetic.std() / canonical_std < 1.3


@pytest.mark.parametrize("ensemble", ["npt", "npt-aniso"])
def test_npt_holds_target_pressure_and_temperature(ensemble):
    target = 0.05  # GPa
    md = MolecularDynamics(LennardJonesPotential(), no_params(), argon_crystal(), ensemble=ensemble,
                           timestep_fs=5.0, temperature_K=50.0, pressure_GPa=target, pdamp_fs=500.0,
                           seed=1, block_steps=100)
    md.run(2000)
    table = md.thermo_table()
    pressure, temperature = table["pressure_GPa"][500:], table["temperature_K"][500:]
    assert abs(pressure.mean() - target) < 0.01, pressure.mean()
    assert abs(temperature.mean() - 50.0) < 3.0, temperature.mean()
    conserved = table["conserved_energy"]
    assert np.abs(conserved - conserved[0]).max() / md.n_atoms < 2e-5


def test_compilations_stay_bounded_while_neighbour_count_changes():
    # The crystal expands under negative pressure: the edge count falls, then the
    # list is rebuilt many times, but the edge capacity only grows along the ladder.
    md = MolecularDynamics(LennardJonesPotential(), no_params(), argon_crystal(a=5.0), ensemble="npt",
                           timestep_fs=5.0, temperature_K=80.0, pressure_GPa=-0.05, pdamp_fs=200.0,
                           seed=2, block_steps=25, skin=0.5)
    md.run(600)
    volumes = md.thermo_table()["volume"]
    assert volumes[-1] > 1.05 * volumes[0]
    assert md.neighbour_list_builds >= 5
    assert md.compilations <= 2


def test_a_model_fitted_to_other_data_reuses_the_compiled_programs_with_its_own_statistics(cuau):
    # An active-learning loop trains a new model of one architecture every iteration. Its
    # statistics are inputs of the compiled programs, not constants in them: nothing compiles
    # again, and the new model moves and predicts on its own scale, shift, E0 and neighbour count.
    from mlip.calculator import _evaluate

    potential, params = cuau
    statistics = dataclasses.replace(potential.statistics, e0={29: -3.5, 79: -3.8}, shift=-0.2, scale=0.03,
                                     avg_num_neighbors=5.0)
    refit = dataclasses.replace(potential, statistics=statistics)
    runs = []
    for model in (potential, refit):
        md = MolecularDynamics(model, params, cuau_cell(), ensemble="nve", timestep_fs=1.0, block_steps=5)
        md.run(5)
        atoms = md.atoms
        atoms.calc = MLIPCalculator(model, params)
        predicted = (atoms.get_potential_energy(), atoms.get_forces())
        runs.append((md, predicted, _evaluate._cache_size()))
    (_, first_predicted, first_programs), (second, predicted, programs) = runs
    assert second.compilations == 0 and programs == first_programs
    assert predicted[0] == pytest.approx(second.atoms.get_potential_energy(), abs=1e-9)
    np.testing.assert_allclose(predicted[1], second.atoms.get_forces(), atol=1e-10)
    assert not np.allclose(predicted[1], first_predicted[1], atol=1e-3)


def test_a_potential_jax_cannot_take_apart_is_a_clear_error():
    class OwnPotential(LennardJonesPotential):  # a user's class, not registered as a pytree
        pass

    with pytest.raises(MLIPError, match="OwnPotential cannot be passed.*register_static"):
        MolecularDynamics(OwnPotential(), no_params(), argon_crystal(), ensemble="nve")


def test_atoms_too_close_stop_with_a_clear_message(cuau):
    potential, params = cuau
    atoms = cuau_cell()
    atoms.positions[1] = atoms.positions[0] + [0.4, 0.0, 0.0]
    md = MolecularDynamics(potential, params, atoms, ensemble="nve", timestep_fs=0.5, max_temperature_K=1e6)
    with pytest.raises(MDStabilityError, match=r"step 1: atoms (0|1) \(Cu\) and (0|1) \(Cu\) are 0\.[34]\d\d Å apart"):
        md.run(10)
    assert md.steps_done == 0 and np.allclose(md.atoms.positions, atoms.positions)


@pytest.mark.parametrize("overlap", [False, True])
def test_atoms_moving_more_than_half_the_skin_in_one_step_stop_with_a_clear_message(cuau, overlap):
    potential, params = cuau
    md = MolecularDynamics(potential, params, cuau_cell(), ensemble="nve", timestep_fs=5.0, skin=0.01,
                           max_temperature_K=1e6, overlap_neighbour_lists=overlap)
    with pytest.raises(MDStabilityError, match=r"step 1: atoms moved more than skin/2 = 0.005 Å in one step"):
        md.run(10)
    assert md.steps_done == 0


def test_exploding_temperature_stops_the_run(cuau):
    potential, params = cuau
    md = MolecularDynamics(potential, params, cuau_cell(), ensemble="nve", timestep_fs=0.5,
                           max_temperature_K=5.0)
    with pytest.raises(MDStabilityError, match="exceeds the limit 5 K"):
        md.run(10)


def test_bad_settings_are_clear_errors(cuau):
    from mlip.errors import DataError, MLIPError

    potential, params = cuau
    with pytest.raises(MLIPError, match="unknown ensemble 'nvt'"):
        MolecularDynamics(potential, params, cuau_cell(), ensemble="nvt")
    with pytest.raises(MLIPError, match="needs a target temperature"):
        MolecularDynamics(potential, params, cuau_cell(), ensemble="langevin")
    with pytest.raises(MLIPError, match="needs a periodic cell"):
        MolecularDynamics(potential, params, molecule("H2O"), ensemble="npt", temperature_K=300)
    with pytest.raises(DataError, match="atom 1 is H"):
        MolecularDynamics(potential, params, molecule("H2O"), ensemble="nve")


def test_md_cli_writes_trajectory_log_and_summary(cuau, tmp_path):
    from mlip.cli import main
    from mlip.training.checkpoint import model_metadata, save_pytree, write_json

    potential, params = cuau
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_json(str(run_dir / "model.json"), model_metadata(potential))
    save_pytree(str(run_dir / "best.msgpack"), params)
    structure = tmp_path / "start.extxyz"
    ase.io.write(structure, cuau_cell())
    trajectory = tmp_path / "md.extxyz"
    code = main(["md", str(run_dir), "--structure", str(structure), "--ensemble", "langevin",
                 "--temperature", "300", "--timestep", "1.0", "--steps", "40", "--interval", "10",
                 "--trajectory", str(trajectory), "--max-temperature", "1e6"])
    assert code == 0
    frames = ase.io.read(trajectory, ":")
    assert len(frames) == 5  # the start and every 10 steps
    assert frames[-1].get_potential_energy() != frames[0].get_potential_energy()
    log_lines = (tmp_path / "md.log").read_text().strip().splitlines()
    assert log_lines[0].startswith("# step") and len(log_lines) == 1 + 5
    summary = json.loads((tmp_path / "md_summary.json").read_text())
    assert summary["steps"] == 40 and summary["stop_reason"] == "completed"
    assert summary["overlap_neighbour_lists"] is False and summary["neighbour_wait_s"] >= 0  # CPU: off
    assert os.path.exists(tmp_path / "md.log")


def test_md_cli_moves_an_ensemble_on_its_uncertainty_biased_energy(cuau, tmp_path, capsys):
    import jax
    from conftest import emt_frames

    from mlip.cli import main
    from mlip.training.checkpoint import model_metadata, save_pytree, write_json
    from mlip.uq import stack_samples

    potential, params = cuau
    rng = np.random.default_rng(0)
    members = stack_samples([jax.tree.map(lambda x: np.asarray(x) * (1 + 0.3 * rng.normal(size=np.shape(x))),
                                          params) for _ in range(3)])
    runs = {}
    for name, stored, uncertainty in [("single", params, None),
                                      ("ensemble", members, {"method": "deep_ensemble", "members": 3})]:
        runs[name] = tmp_path / name
        runs[name].mkdir()
        write_json(str(runs[name] / "model.json"), model_metadata(potential, uncertainty))
        save_pytree(str(runs[name] / "best.msgpack"), stored)
    structure, reference = tmp_path / "start.extxyz", tmp_path / "reference.extxyz"
    ase.io.write(structure, cuau_cell())
    ase.io.write(reference, emt_frames(4, seed=2))  # two compositions: each member's offsets are fitted

    def first_energy(run, *options):
        trajectory = tmp_path / f"{run}{len(options)}.extxyz"
        code = main(["md", str(runs[run]), "--structure", str(structure), "--ensemble", "langevin",
                     "--temperature", "300", "--steps", "4", "--interval", "4", "--trajectory", str(trajectory),
                     "--no-progress", *options])
        return code, (ase.io.read(trajectory, 0).get_potential_energy() if code == 0 else None)

    code, plain = first_energy("ensemble")
    code_biased, biased = first_energy("ensemble", "--uncertainty-bias", "2", "--bias-reference", str(reference))
    assert code == code_biased == 0 and biased < plain - 1e-6  # E − τσ_E, σ_E > 0
    assert "moving on E - 2 sigma_E" in capsys.readouterr().out
    # Without --bias-reference it needs the run's training data (config.yaml), and says so.
    assert first_energy("ensemble", "--uncertainty-bias", "1")[0] == 2
    assert "--bias-reference" in capsys.readouterr().err
    assert first_energy("single", "--uncertainty-bias", "1", "--bias-reference", str(reference))[0] == 2
    assert "parameter samples" in capsys.readouterr().err


def test_small_molecule_never_rebuilds_its_complete_neighbour_list():
    potential, params = make_potential([1, 6, 8], r_max=6.0, scale=0.05)  # > every distance
    atoms = molecule("CH3CH2OH")
    md = MolecularDynamics(potential, params, atoms, ensemble="langevin", temperature_K=2000.0, skin=0.01,
                           timestep_fs=0.5, max_temperature_K=1e6, min_distance_fraction=0.1)
    md.run(60)
    assert md.neighbour_list_builds == 1 and md.steps_done == 60


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_large_xla_scratch_buffers_stay_mapped_between_calls():
    # A fresh interpreter: the settings must be in force before XLA's threads allocate.
    program = """
import resource, mlip, jax, jax.numpy as jnp
assert mlip.host_memory.applied
x = jnp.ones((5000, 4), jnp.float32)
f = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x)  # a 100 MB [5000, 5000] scratch buffer
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(f(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The heap grows over the first calls (at times to two buffers); then calls stop faulting.
# Under load (another process compiling) a free can land after the next call's allocation,
# so a later call now and then grows the heap once more: hence the minimum over many calls.
print(min(faults[2:]))
"""
    environment = {**os.environ, "MLIP_KEEP_HOST_MEMORY": "1"}
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
    # Unmapped and mapped afresh (glibc's defaults), the buffer faults in its 24 000 pages
    # in every single call.
    assert int(result.stdout.split()[-1]) < 2000


def test_python_api_uses_the_persistent_compilation_cache(tmp_path, monkeypatch):
    import jax

    from mlip.compilation_cache import enable_compilation_cache

    previous = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("MLIP_COMPILATION_CACHE", "off")
        enable_compilation_cache()
        assert not jax.config.jax_compilation_cache_dir
        monkeypatch.setenv("MLIP_COMPILATION_CACHE", str(tmp_path))
        enable_compilation_cache()  # what MLIPCalculator and MolecularDynamics call
        assert jax.config.jax_compilation_cache_dir == str(tmp_path)
        monkeypatch.setenv("MLIP_COMPILATION_CACHE", str(tmp_path / "other"))
        enable_compilation_cache()  # a directory already set is kept
        assert jax.config.jax_compilation_cache_dir == str(tmp_path)
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)


def test_gpu_autotuning_is_switched_off_only_where_a_gpu_plugin_is_and_the_user_set_nothing(monkeypatch):
    import pkgutil
    from types import SimpleNamespace

    import jax

    from mlip import compilation_cache

    def installed(*names):
        monkeypatch.setattr(pkgutil, "iter_modules", lambda: [SimpleNamespace(name=n) for n in names])

    monkeypatch.delenv("MLIP_GPU_AUTOTUNE", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    installed("numpy", "jaxlib")  # CPU only: nothing changes
    assert not compilation_cache.gpu_autotuning_off()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
    installed("jax_cuda13_plugin")
    jax.devices()  # this process's backends have started: too late for the flag, and said so on a GPU
    backend = jax.default_backend
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with pytest.warns(UserWarning, match="autotuning stays on"):
        assert compilation_cache.gpu_autotuning_off()
    monkeypatch.setattr(jax, "default_backend", backend)
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_gpu_autotune_level=0"
    assert not compilation_cache.gpu_autotuning_off()  # once only: a level is set now
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=4")  # the user's own level stays
    assert not compilation_cache.gpu_autotuning_off()
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv("MLIP_GPU_AUTOTUNE", "1")  # XLA's default asked for
    assert not compilation_cache.gpu_autotuning_off()
    assert "XLA_FLAGS" not in os.environ


@pytest.mark.parametrize("ensemble", ["langevin", "npt"])
def test_replicas_step_together_exactly_as_each_alone(cuau, ensemble):
    from mlip.md.replicas import ReplicaDynamics

    potential, params = cuau
    structures = [cuau_cell(seed=1), cuau_cell(seed=2), cuau_cell(seed=1)]
    temperatures, seeds = [300.0, 900.0, 600.0], [5, 6, 7]
    # A skin of 0.1 Å: each replica rebuilds its own list, at its own steps.
    settings = dict(ensemble=ensemble, timestep_fs=2.0, skin=0.1, max_temperature_K=1e6, pressure_GPa=1.0)
    together = ReplicaDynamics(potential, params, structures, temperatures, seeds, **settings)
    together.run(12)
    assert together.compilations <= 1 and together.neighbour_list_builds > len(structures)
    for replica, (atoms, temperature, seed) in enumerate(zip(structures, temperatures, seeds)):
        alone = MolecularDynamics(potential, params, atoms, temperature_K=temperature, seed=seed, **settings)
        alone.run(12)
        result, expected = together.atoms(replica), alone.atoms
        np.testing.assert_allclose(result.positions, expected.positions, atol=1e-9)
        np.testing.assert_allclose(result.get_momenta(), expected.get_momenta(), atol=1e-9)
        np.testing.assert_allclose(result.cell.array, expected.cell.array, atol=1e-9)
        assert result.get_potential_energy() == pytest.approx(expected.get_potential_energy(), abs=1e-9)
    assert together.steps_done.tolist() == [12, 12, 12] and not together.stopped


def test_replicas_of_an_ewald_model_and_of_a_biased_ensemble_follow_their_lone_runs(cuau):
    import jax

    from mlip.md.replicas import ReplicaDynamics
    from mlip.uq import PosteriorPotential, UncertaintyBiasedPotential, stack_samples

    # Reciprocal-space sums per cell on the union graph; σ_E per replica for the bias.
    les, les_params = make_potential([29, 79], r_max=4.0, scale=0.05,
                                     long_range={"name": "les", "sigma": 1.0, "k_resolution": 1.5})
    potential, params = cuau
    rng = np.random.default_rng(2)
    members = stack_samples([jax.tree.map(lambda leaf: np.asarray(leaf) * (1 + 0.2 * rng.normal(size=leaf.shape)),
                                          params) for _ in range(3)])
    biased = UncertaintyBiasedPotential(PosteriorPotential(potential, "deep_ensemble"), strength=1.0)
    cluster = cuau_cell(repeat=1, seed=2)  # non-periodic beside a periodic cell: k sums for one, none for the other
    cluster.pbc = False
    structures, temperatures, seeds = [cuau_cell(seed=1), cluster], [300.0, 900.0], [5, 6]
    for model, model_params in [(les, les_params), (biased, members)]:
        settings = dict(ensemble="langevin", timestep_fs=2.0, skin=0.3, max_temperature_K=1e6)
        together = ReplicaDynamics(model, model_params, structures, temperatures, seeds, **settings)
        together.run(6)
        for replica, (atoms, temperature, seed) in enumerate(zip(structures, temperatures, seeds)):
            alone = MolecularDynamics(model, model_params, atoms, temperature_K=temperature, seed=seed, **settings)
            alone.run(6)
            np.testing.assert_allclose(together.atoms(replica).positions, alone.atoms.positions, atol=1e-9)
            assert together.atoms(replica).get_potential_energy() == pytest.approx(
                alone.atoms.get_potential_energy(), abs=1e-9)


def test_an_unstable_replica_stops_with_its_message_and_the_others_go_on(cuau):
    from mlip.md.replicas import ReplicaDynamics

    potential, params = cuau
    crushed = cuau_cell()
    crushed.positions[1] = crushed.positions[0] + [0.45, 0.0, 0.0]
    md = ReplicaDynamics(potential, params, [cuau_cell(), crushed, cuau_cell(seed=3)], [300.0] * 3,
                         ensemble="nose-hoover", timestep_fs=0.5, max_temperature_K=1e6)
    md.run(10)
    assert list(md.stopped) == [1]
    assert re.match(r"step 1: atoms (0|1) \(Cu\) and (0|1) \(Cu\) are 0\.[34]\d\d Å apart", md.stopped[1])
    md.stop(2, "enough")
    md.run(5)
    assert md.steps_done.tolist() == [15, 0, 10] and md.stopped[2] == "enough"
    assert np.allclose(md.atoms(1).positions, crushed.positions)
    cluster = cuau_cell(repeat=1)
    cluster.pbc = False
    with pytest.raises(MLIPError, match=r"replica 1: ensemble npt needs a periodic cell"):
        ReplicaDynamics(potential, params, [cuau_cell(), cluster], [300.0] * 2, ensemble="npt")


def test_replicas_of_different_sizes_and_periodicity_follow_their_lone_runs(cuau):
    from mlip.md.replicas import ReplicaDynamics, replica_groups

    # Exploration from several seeds: a bulk cell, a slab (periodic in two directions) and a
    # cluster (none), padded to the largest. Each atom's Langevin noise is drawn by its index, so
    # the padding changes nothing.
    potential, params = cuau
    slab = cuau_cell(seed=2)[:20]
    slab.pbc = [True, True, False]
    slab.center(vacuum=4.0, axis=2)
    cluster = cuau_cell(repeat=1, seed=3)
    cluster.pbc = False
    structures, temperatures, seeds = [cuau_cell(seed=1), slab, cluster], [300.0, 900.0, 600.0], [5, 6, 7]
    settings = dict(ensemble="langevin", timestep_fs=2.0, skin=0.1, max_temperature_K=1e6)
    together = ReplicaDynamics(potential, params, structures, temperatures, seeds, **settings)
    together.run(8)
    assert together.compilations <= 1 and together.atom_counts.tolist() == [32, 20, 4]
    for replica, (atoms, temperature, seed) in enumerate(zip(structures, temperatures, seeds)):
        alone = MolecularDynamics(potential, params, atoms, temperature_K=temperature, seed=seed, **settings)
        alone.run(8)
        result = together.atoms(replica)
        assert result.pbc.tolist() == atoms.pbc.tolist()
        np.testing.assert_allclose(result.positions, alone.atoms.positions, atol=1e-9)
        np.testing.assert_allclose(result.get_momenta(), alone.atoms.get_momenta(), atol=1e-9)
        assert result.get_potential_energy() == pytest.approx(alone.atoms.get_potential_energy(), abs=1e-9)
        assert together.temperatures_K()[replica] == pytest.approx(alone.current_thermo()["temperature_K"], rel=1e-6)
    # Groups to step together: the fewest whose padding stays within max_padding x their atoms.
    assert replica_groups([32, 32, 28, 28, 16, 16, 13, 13]) == [list(range(8))]
    assert replica_groups([10, 200, 10]) == [[1], [0, 2]]
    assert replica_groups([13, 32], max_padding=1.0) == [[1], [0]]


def test_float32_molecule_replicas_follow_their_lone_runs():
    from mlip.md.replicas import ReplicaDynamics

    # The exploration of active learning: one molecule at several temperatures, float32.
    potential, params = make_potential([1, 6], dtype="float32", r_max=3.0, scale=0.001)
    butane = molecule("trans-butane")
    settings = dict(ensemble="langevin", timestep_fs=0.5, skin=0.15, max_temperature_K=1e6)
    together = ReplicaDynamics(potential, params, [butane] * 3, [300.0, 600.0, 1200.0], [0, 1, 2], **settings)
    together.run(40)
    assert together.neighbour_list_builds > 3  # a 3 Å cutoff: the lists are not complete
    for replica, temperature in enumerate([300.0, 600.0, 1200.0]):
        alone = MolecularDynamics(potential, params, butane, temperature_K=temperature, seed=replica, **settings)
        alone.run(40)
        np.testing.assert_allclose(together.atoms(replica).positions, alone.atoms.positions, atol=1e-4)
    assert together.temperatures_K().shape == (3,)

"""Long-range physics: Ewald sums against Madelung constants and invariants, LES inside the potential."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from conftest import make_potential
from mlip.data.batching import build_samples, pack_samples
from mlip.data.neighbours import reciprocal_indices
from mlip.data.reader import Frame
from mlip.physics.ewald import COULOMB_CONSTANT, direct_energy, ewald_energy, gaussian_charge_energy
from mlip.physics.latent_ewald import conserve_total_charge


def ionic_charges(atoms, cation):
    return np.where(atoms.numbers == cation, 1.0, -1.0)


@pytest.mark.parametrize("structure, cation, distance, madelung", [
    (bulk("NaCl", "rocksalt", a=5.64, cubic=True), 11, 2.82, 1.747565),
    (bulk("NaCl", "rocksalt", a=5.64), 11, 2.82, 1.747565),  # 2-atom triclinic primitive cell
    (bulk("CsCl", "cesiumchloride", a=4.0), 55, 4.0 * math.sqrt(3) / 2, 1.762675),
])
def test_madelung_constants(structure, cation, distance, madelung):
    energy = ewald_energy(structure.positions, ionic_charges(structure, cation), structure.cell.array,
                          accuracy=1e-10)
    pairs = len(structure) / 2
    assert -energy / pairs * distance / COULOMB_CONSTANT == pytest.approx(madelung, rel=1e-6)


def test_energy_is_independent_of_the_splitting_parameter_for_a_charged_triclinic_cell():
    rng = np.random.default_rng(0)
    cell = np.array([[4.0, 0.3, 0.1], [0.5, 5.0, 0.2], [0.7, -0.4, 4.5]])
    positions = rng.uniform(0, 1, (6, 3)) @ cell
    charges = rng.normal(size=6)  # net charge: the background term is needed
    energies = [ewald_energy(positions, charges, cell, alpha=alpha, accuracy=1e-12) for alpha in (0.5, 0.8, 1.2)]
    np.testing.assert_allclose(energies, energies[0], rtol=1e-9)


def test_supercell_has_eight_times_the_energy_and_perfect_lattice_no_forces():
    nacl = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    charges = ionic_charges(nacl, 11)
    supercell = nacl.repeat(2)
    single = ewald_energy(nacl.positions, charges, nacl.cell.array, accuracy=1e-10)
    eight = ewald_energy(supercell.positions, np.tile(charges, 8), supercell.cell.array, accuracy=1e-10)
    assert eight == pytest.approx(8 * single, rel=1e-9)
    forces = -jax.jit(jax.grad(_point_energy_function(nacl.positions, charges, nacl.cell.array)))(
        jnp.asarray(nacl.positions))
    assert np.abs(forces).max() < 1e-8


def _point_energy_function(positions, charges, cell, alpha=0.9, accuracy=1e-12):
    """Positions -> total `point_charge_energy` of one periodic structure (pair list fixed at ``positions``)."""
    from mlip.data.neighbours import neighbour_list
    from mlip.physics.ewald import point_charge_energy

    s = math.sqrt(-math.log(accuracy))
    r_cutoff = s / alpha
    pairs = tuple(map(jnp.asarray, neighbour_list(np.asarray(positions), np.asarray(cell), np.ones(3, bool),
                                                  r_cutoff + 1.0)))
    k_indices = jnp.asarray(reciprocal_indices(np.asarray(cell), 2 * alpha * s)[None])
    n = len(charges)
    return lambda r: jnp.sum(point_charge_energy(jnp.asarray(charges), r, jnp.asarray(cell)[None],
                                                 jnp.zeros(n, jnp.int32), k_indices, *pairs, alpha, r_cutoff))


def test_particle_mesh_ewald_matches_the_direct_sum_in_a_charged_triclinic_cell():
    rng = np.random.default_rng(1)
    cell = np.array([[6.0, 0.5, 0.0], [0.8, 7.0, 0.3], [0.2, -0.6, 6.5]])
    positions = rng.uniform(0, 1, (20, 3)) @ cell + 3.0  # some atoms outside the cell
    charges = rng.normal(size=20)
    direct = ewald_energy(positions, charges, cell, accuracy=1e-8)
    mesh = ewald_energy(positions, charges, cell, accuracy=1e-8, mesh=True)
    assert mesh == pytest.approx(direct, rel=1e-5)


def test_gaussian_charges_in_a_growing_box_approach_the_isolated_sum():
    water = molecule("H2O")
    charges = jnp.asarray([-0.8, 0.4, 0.4])
    positions = jnp.asarray(water.positions)
    isolated = float(jnp.sum(direct_energy(charges, positions, jnp.zeros(3, jnp.int32), jnp.ones(3, bool), 1.0)))
    errors = []
    for length in (10.0, 20.0, 30.0):
        cell = np.eye(3) * length
        k_indices = reciprocal_indices(cell, 2 * math.pi / 1.0)[None]
        periodic = gaussian_charge_energy(charges, positions + length / 2, jnp.asarray(cell)[None],
                                          jnp.zeros(3, jnp.int32), jnp.asarray(k_indices), 1.0)
        errors.append(abs(float(jnp.sum(periodic)) - isolated))
    # Dipole-dipole interaction with the images falls as 1/L³.
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 2e-3 * abs(isolated)


def test_total_charge_is_conserved_in_padded_batches(keys):
    node_graph = jnp.asarray([0, 0, 0, 1, 1, 2, 2, 2])
    node_mask = jnp.asarray([1, 1, 1, 1, 1, 0, 0, 0], bool)  # graph 2 is padding
    total = jnp.asarray([1.0, -2.0, 0.0])
    charges = conserve_total_charge(jax.random.normal(next(keys), (8,)), total, node_graph, node_mask)
    np.testing.assert_allclose(jax.ops.segment_sum(charges, node_graph, 3), [1.0, -2.0, 0.0], atol=1e-12)
    assert np.all(np.asarray(charges)[5:] == 0.0)


# ----------------------------------------------------------------------------- LES in the potential

@pytest.fixture(scope="module")
def les_model():
    return make_potential([1, 8, 11, 17], long_range={"name": "les", "sigma": 1.0, "k_resolution": 1.5},
                          charge_spin_embedding=True)


@pytest.fixture(scope="module")
def ewald_mp_model():
    return make_potential([1, 8, 11, 17], ewald_message_passing={"k_cutoff": 1.5, "aperiodic_spacing": 0.15})


@pytest.fixture(params=["les", "ewald_mp"])
def long_range_model(request, les_model, ewald_mp_model):
    return {"les": les_model, "ewald_mp": ewald_mp_model}[request.param]


def _frame(atoms, charge=0.0, spin=1.0):
    return Frame(positions=atoms.positions.copy(), numbers=atoms.numbers, cell=atoms.cell.array.copy(),
                 pbc=np.asarray(atoms.pbc), charge=charge, spin=spin)


_COMPILED = {}


def _apply(potential, params, frames):
    samples = build_samples(frames, potential.cutoff, potential.k_cutoff)
    graph = pack_samples(samples, None, None, np.float64)
    if potential not in _COMPILED:  # one jit per potential: repeated calls reuse its compilations
        _COMPILED[potential] = jax.jit(lambda p, g: potential.apply(p, g, True, True))
    return jax.device_get(_COMPILED[potential](params, graph)), graph


def _ion_cell():
    atoms = bulk("NaCl", "rocksalt", a=5.2)  # 2-atom triclinic cell: Ewald images matter
    atoms = atoms.repeat((2, 1, 1))
    atoms.rattle(0.1, seed=3)
    return atoms


def _ion_water():
    atoms = molecule("H2O") + Atoms("Na", positions=[[0.0, 0.0, 7.5]])  # Na beyond the 3 Å cutoff
    atoms.rattle(0.05, seed=4)
    return atoms


def test_long_range_forces_and_stress_are_derivatives_of_the_energy(long_range_model):
    potential, params = long_range_model
    cell_atoms = _ion_cell()
    frame = _frame(cell_atoms, charge=1.0)  # a charged cell: background term included
    outputs, _ = _apply(potential, params, [frame])

    def energy(positions=None, cell=None):
        changed = _frame(cell_atoms, charge=1.0)
        if positions is not None:
            changed.positions = positions
        if cell is not None:
            changed.positions = cell_atoms.positions @ np.linalg.solve(cell_atoms.cell.array, cell)
            changed.cell = cell
        return float(_apply(potential, params, [changed])[0]["energy"][0])

    h = 1e-4
    for atom, axis in [(0, 0), (2, 1), (3, 2)]:
        step = np.zeros_like(cell_atoms.positions)
        step[atom, axis] = h
        numeric = -(energy(cell_atoms.positions + step) - energy(cell_atoms.positions - step)) / (2 * h)
        assert outputs["forces"][atom, axis] == pytest.approx(numeric, abs=1e-6)
    volume = cell_atoms.get_volume()
    for a, b in [(0, 0), (1, 2)]:
        strain = np.zeros((3, 3))
        strain[a, b] = strain[b, a] = h
        numeric = (energy(cell=cell_atoms.cell.array @ (np.eye(3) + strain))
                   - energy(cell=cell_atoms.cell.array @ (np.eye(3) - strain))) / (2 * h) / volume
        if a != b:
            numeric /= 2  # the symmetric strain moved two components
        assert outputs["stress"][0, a, b] == pytest.approx(numeric, abs=1e-7)


def test_long_range_terms_are_rotation_translation_invariant(long_range_model):
    potential, params = long_range_model
    rotation = np.linalg.qr(np.random.default_rng(5).normal(size=(3, 3)))[0]
    shift = np.array([3.0, -2.0, 1.0])
    for atoms in (_ion_water(), _ion_cell()):  # a molecule, and a cell rotated with its atoms
        reference, _ = _apply(potential, params, [_frame(atoms, charge=1.0)])
        moved = atoms.copy()
        moved.set_cell(atoms.cell.array @ rotation.T)
        moved.positions = atoms.positions @ rotation.T + shift
        rotated, _ = _apply(potential, params, [_frame(moved, charge=1.0)])
        n = len(atoms)
        assert rotated["energy"][0] == pytest.approx(reference["energy"][0], abs=1e-9)
        np.testing.assert_allclose(rotated["forces"][:n], reference["forces"][:n] @ rotation.T, atol=1e-9)
    # The sodium ion is beyond the 3 Å cutoff: only the long-range term couples it to the water.
    reference, _ = _apply(potential, params, [_frame(_ion_water(), charge=1.0)])
    assert np.abs(reference["forces"][3]).max() > 1e-6


def test_ewald_message_passing_with_a_zero_filter_is_the_backbone(ewald_mp_model):
    # The block's update is added to the backbone's features: a zero update leaves the backbone.
    from mlip.physics.ewald_message_passing import EwaldBlock

    potential, _ = ewald_mp_model
    samples = build_samples([_frame(_ion_water()), _frame(_ion_cell())], potential.cutoff, potential.k_cutoff)
    graph = jax.tree.map(jnp.asarray, pack_samples(samples, None, None, np.float64))
    block = EwaldBlock(channels=4, k_cutoff=1.5, aperiodic_spacing=0.15, aperiodic_cutoff=0.6)
    features = jax.random.normal(jax.random.PRNGKey(1), (graph.positions.shape[0], 4), jnp.float64)
    params = block.init(jax.random.PRNGKey(0), features, graph, graph.positions, graph.cell)["params"]
    update = block.apply({"params": params}, features, graph, graph.positions, graph.cell)
    assert np.abs(np.asarray(update)[graph.node_mask]).max() > 1e-6
    zeroed = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.zeros_like(leaf) if "filter" in jax.tree_util.keystr(path) else leaf, params)
    assert np.all(np.asarray(block.apply({"params": zeroed}, features, graph, graph.positions, graph.cell)) == 0.0)


def test_same_geometry_at_two_total_charges_gives_two_energies(les_model):
    potential, params = les_model
    atoms = _ion_water()
    outputs, _ = _apply(potential, params, [_frame(atoms, charge=0.0, spin=2.0), _frame(atoms, charge=1.0)])
    assert abs(outputs["energy"][0] - outputs["energy"][1]) > 1e-3
    # Batched with other graphs, each keeps its own total charge.
    sums = [outputs["charges"][:4].sum(), outputs["charges"][4:8].sum()]
    np.testing.assert_allclose(sums, [0.0, 1.0], atol=1e-9)


def test_neutral_singlet_embedding_adds_nothing(les_model):
    potential, params = les_model
    zeroed = {**params, "backbone": {**params["backbone"], "charge_spin": jax.tree.map(
        jnp.zeros_like, params["backbone"]["charge_spin"])}}
    atoms = _ion_water()
    neutral = [_apply(potential, p, [_frame(atoms)])[0]["energy"][0] for p in (params, zeroed)]
    assert neutral[0] == pytest.approx(neutral[1], abs=1e-12)
    cation = [_apply(potential, p, [_frame(atoms, charge=1.0, spin=2.0)])[0]["energy"][0] for p in (params, zeroed)]
    assert abs(cation[0] - cation[1]) > 1e-6


# ----------------------------------------------------------------------------- with the rest of mlip

def test_les_md_matches_ase_with_the_calculator_in_a_charged_cell(monkeypatch):
    from ase import units

    import mlip.data.batching

    # The particle mesh for this small cell, so that MD and the calculator run that path too.
    monkeypatch.setattr(mlip.data.batching, "MESH_MIN_WORK", 0)

    from mlip.calculator import MLIPCalculator
    from mlip.md import MolecularDynamics
    from mlip.md.simulation import maxwell_boltzmann_momenta

    potential, params = make_potential([11, 17], long_range={"name": "les"}, charge_spin_embedding=True,
                                       scale=0.05)
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    del atoms[0]  # a sodium vacancy: total charge −1
    atoms.info["total_charge"] = -1
    atoms.rattle(0.05, seed=2)
    atoms.set_momenta(maxwell_boltzmann_momenta(atoms.get_masses(), 300.0, 2))
    md = MolecularDynamics(potential, params, atoms, ensemble="npt", timestep_fs=1.0, temperature_K=300.0,
                           pressure_GPa=1.0, skin=0.1, max_temperature_K=1e6)
    md.run(8)
    from ase.md.nose_hoover_chain import IsotropicMTKNPT

    reference = atoms.copy()
    reference.calc = MLIPCalculator(potential, params)
    dt = 1.0 * units.fs
    IsotropicMTKNPT(reference, timestep=dt, temperature_K=300.0, pressure_au=1.0 * units.GPa,
                    tdamp=100 * dt, pdamp=1000 * dt).run(8)
    assert md.neighbour_list_builds > 1 and md._template.mesh_shape
    np.testing.assert_allclose(md.atoms.positions, reference.positions, atol=1e-9)
    np.testing.assert_allclose(md.atoms.cell.array, reference.cell.array, atol=1e-9)
    # The same with the next lists built on the host thread (the GPU default): the mesh and
    # the list come in a block late, from the positions they were built at.
    overlapped = MolecularDynamics(potential, params, atoms, ensemble="npt", timestep_fs=1.0, temperature_K=300.0,
                                   pressure_GPa=1.0, skin=0.1, max_temperature_K=1e6, overlap_neighbour_lists=True)
    overlapped.run(8)
    assert overlapped._list_thread is not None
    np.testing.assert_allclose(overlapped.atoms.positions, reference.positions, atol=1e-9)
    np.testing.assert_allclose(overlapped.atoms.cell.array, reference.cell.array, atol=1e-9)
    charges = reference.calc.results["charges"]
    assert charges.shape == (7,) and charges.sum() == pytest.approx(-1.0, abs=1e-9)
    # The calculator notices a change of total charge in atoms.info.
    energy = reference.get_potential_energy()
    reference.info["total_charge"] = 0
    assert reference.get_potential_energy() != pytest.approx(energy, abs=1e-6)
    assert reference.calc.results["charges"].sum() == pytest.approx(0.0, abs=1e-9)


def test_long_range_model_with_magnetic_moments_trains_from_yaml_with_an_ensemble(tmp_path):
    import ase.io
    import yaml

    from conftest import emt_frames
    from mlip.calculator import MLIPCalculator
    from mlip.cli import main

    frames = emt_frames(8)
    for atoms in frames:  # a synthetic moment per element: the wiring is under test here
        atoms.arrays["REF_magmoms"] = np.where(atoms.numbers == 79, 0.5, 0.1)
    data = str(tmp_path / "magnetic.extxyz")
    ase.io.write(data, frames)
    config = {"run_dir": str(tmp_path / "les"), "seed": 1,
              "data": {"train": f"{data}@0:6", "valid": f"{data}@6:8", "magmoms_key": "REF_magmoms"},
              "model": {"backbone": {"num_channels": 4, "max_ell": 1, "correlation": 1, "radial_mlp": [8],
                                     "r_max": 3.0, "num_interactions": 1, "charge_spin_embedding": True,
                                     "ewald_message_passing": {"k_cutoff": 1.0}},
                        "long_range": {"name": "les", "charge_mlp": [4]}, "magmoms": True},
              "uncertainty": {"method": "deep_ensemble", "members": 2},
              "training": {"max_epochs": 1, "batch_size": 3, "progress_bar": False, "plots": False}}
    path = tmp_path / "les.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    calc = MLIPCalculator.from_run(config["run_dir"])
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = calc
    atoms.get_potential_energy()
    assert {"charges", "magmoms", "energy_std", "stress"} <= set(calc.results)
    assert calc.results["charges"].sum() == pytest.approx(0.0, abs=1e-5)
    assert calc.results["magmoms"].shape == (4,) and np.all(calc.results["magmoms"] >= 0)
    import json

    summary = json.load(open(tmp_path / "les" / "summary.json"))
    assert "magmoms_mae" in summary["valid"]


def test_magnetic_moments_are_per_site_and_the_energy_extensive():
    potential, params = make_potential([29, 79], magmoms=True)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms[1].symbol = "Au"
    atoms.rattle(0.05, seed=1)
    single, _ = _apply(potential, params, [_frame(atoms)])
    supercell, _ = _apply(potential, params, [_frame(atoms.repeat(2))])
    assert supercell["energy"][0] == pytest.approx(8 * single["energy"][0], rel=1e-9)
    np.testing.assert_allclose(supercell["magmoms"][:32], np.tile(single["magmoms"][:4], 8), atol=1e-9)


def test_batched_and_blocked_reciprocal_sums_equal_single_structure_ones(les_model, monkeypatch):
    import mlip.physics.ewald as ewald

    potential, params = les_model
    frames = [_frame(_ion_cell(), charge=1.0), _frame(bulk("NaCl", "rocksalt", a=5.5, cubic=True))]
    alone = [_apply(potential, params, [frame])[0] for frame in frames]
    # Several blocks, and the gather path of a batch: a shape not compiled before, so traced anew.
    monkeypatch.setattr(ewald, "K_BLOCK", 16)
    together, _ = _apply(potential, params, frames)
    np.testing.assert_allclose(together["energy"][:2], [a["energy"][0] for a in alone], rtol=1e-10)
    np.testing.assert_allclose(together["forces"][:4], alone[0]["forces"][:4], atol=1e-10)
    np.testing.assert_allclose(together["stress"][1], alone[1]["stress"][0], atol=1e-10)


def test_les_on_a_particle_mesh_matches_the_direct_reciprocal_sum(les_model, monkeypatch):
    import mlip.data.batching

    potential, params = les_model
    frames = [_frame(_ion_cell(), charge=1.0)]
    direct, graph = _apply(potential, params, frames)
    monkeypatch.setattr(mlip.data.batching, "MESH_MIN_WORK", 0)
    mesh, mesh_graph = _apply(potential, params, frames)
    assert mesh_graph.mesh_shape and not graph.mesh_shape
    assert mesh["energy"][0] == pytest.approx(direct["energy"][0], rel=1e-5)  # spline error ~6e-6
    # The smallest mesh (12 points a side for this 4-atom cell): spline errors of ~1e-4.
    np.testing.assert_allclose(mesh["forces"], direct["forces"], atol=5e-4 * np.abs(direct["forces"]).max())
    np.testing.assert_allclose(mesh["stress"], direct["stress"], atol=5e-4 * np.abs(direct["stress"]).max())


def test_zbl_repulsion_is_the_screened_coulomb_energy_rises_steeply_and_forces_are_its_gradient():
    from ase.data import covalent_radii

    plain, params = make_potential([1, 8], num_interactions=1, max_ell=1)
    repulsive, _ = make_potential([1, 8], repulsion={"name": "zbl"}, num_interactions=1, max_ell=1)  # no parameters

    def energy_and_forces(potential, atoms):
        out, _ = _apply(potential, params, [_frame(atoms)])
        return out["energy"][0], out["forces"][:len(atoms)]

    def dimer(distance, symbols="OH"):
        return Atoms(symbols, positions=[[0, 0, 0], [distance, 0, 0]])

    # An O–H pair at 0.5 Å: the added energy is the ZBL formula times the envelope (r_c = 0.97 Å).
    r, z1, z2 = 0.5, 8, 1
    a = 0.8854 * 0.52917721 / (z1**0.23 + z2**0.23)
    phi = sum(c * math.exp(-e * r / a) for c, e in zip((0.1818, 0.5099, 0.2802, 0.02817), (3.2, 0.9423, 0.4029, 0.2016)))
    x = r / (covalent_radii[8] + covalent_radii[1])
    envelope = 1 - 28 * x**6 + 48 * x**7 - 21 * x**8  # p = 6
    added = energy_and_forces(repulsive, dimer(r))[0] - energy_and_forces(plain, dimer(r))[0]
    assert added == pytest.approx(COULOMB_CONSTANT * z1 * z2 / r * phi * envelope, rel=1e-10)
    # Steep at short range, nothing beyond the covalent radii.
    added = [energy_and_forces(repulsive, dimer(d, "OO"))[0] - energy_and_forces(plain, dimer(d, "OO"))[0]
             for d in (0.3, 0.6, 0.9, 1.2, 1.4)]
    assert added[0] > 100.0 and added[0] > 5 * added[1] > 0 and np.all(np.diff(added) <= 0) and added[-1] == 0.0
    # Forces: minus the finite-difference gradient, on a squeezed water with pairs inside the radii.
    water = molecule("H2O")
    water.positions *= 0.6
    forces = energy_and_forces(repulsive, water)[1]
    h = 1e-5
    for atom, component in ((0, 2), (1, 1)):
        plus, minus = water.copy(), water.copy()
        plus.positions[atom, component] += h
        minus.positions[atom, component] -= h
        derivative = (energy_and_forces(repulsive, plus)[0] - energy_and_forces(repulsive, minus)[0]) / (2 * h)
        assert -derivative == pytest.approx(forces[atom, component], rel=1e-6)

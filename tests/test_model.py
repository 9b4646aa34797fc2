"""Physics of every backbone by invariants (float64): symmetry, derivatives, periodicity, padding."""

import jax
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from conftest import make_potential
from mlip.data.batching import PaddedSizes, build_sample, build_samples, pack_samples, sizes_for
from mlip.data.reader import Frame
from mlip.models.radial import polynomial_envelope


def frame_of(atoms) -> Frame:
    return Frame(positions=np.asarray(atoms.positions, float), numbers=np.asarray(atoms.numbers),
                 cell=np.asarray(atoms.cell.array, float), pbc=np.asarray(atoms.pbc))


# Every backbone, and MACE with the all-to-all block (tiny: 2 heads of 4).
MODELS = {"mace": dict(backbone_name="mace"), "transformer": dict(backbone_name="transformer"),
          "mace+all_to_all": dict(backbone_name="mace", all_to_all={"num_heads": 2, "head_dim": 4})}


@pytest.fixture(scope="module", params=list(MODELS))
def model_name(request):
    return request.param


@pytest.fixture(scope="module")
def molecule_model(model_name):
    return make_potential([1, 6, 8], **MODELS[model_name])


@pytest.fixture(scope="module")
def bulk_model(model_name):
    return make_potential([29, 79], **MODELS[model_name])


@pytest.fixture(scope="module")
def apply_fn():
    cache = {}

    def run(potential, params, atoms, stress=False, sizes=None):
        key = (id(potential), stress)
        if key not in cache:
            cache[key] = jax.jit(lambda p, g: potential.apply(p, g, True, stress))
        sample = build_sample(frame_of(atoms), potential.cutoff)
        graph = pack_samples([sample], sizes, None, np.float64)
        out = jax.device_get(cache[key](params, graph))
        n = len(atoms)
        return float(out["energy"][0]), out["forces"][:n], (out["stress"][0] if stress else None)
    return run


def ethanol():
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=0)
    return atoms


def random_orthogonal(seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def test_rotation_reflection_translation_invariance(molecule_model, apply_fn):
    potential, params = molecule_model
    atoms = ethanol()
    energy, forces, _ = apply_fn(potential, params, atoms)
    assert abs(energy) > 1e-3  # a non-trivial model
    for seed, reflect in ((1, False), (2, True)):
        rotation = random_orthogonal(seed)
        if reflect == (np.linalg.det(rotation) > 0):
            rotation = -rotation
        moved = atoms.copy()
        moved.positions = atoms.positions @ rotation.T + np.array([1.3, -2.0, 0.7])
        energy2, forces2, _ = apply_fn(potential, params, moved)
        assert energy2 == pytest.approx(energy, rel=1e-9, abs=1e-10)
        np.testing.assert_allclose(forces2, forces @ rotation.T, atol=1e-9)


def test_permutation_equivariance(molecule_model, apply_fn):
    potential, params = molecule_model
    atoms = ethanol()
    order = np.random.default_rng(0).permutation(len(atoms))
    energy, forces, _ = apply_fn(potential, params, atoms)
    energy2, forces2, _ = apply_fn(potential, params, atoms[order])
    assert energy2 == pytest.approx(energy, rel=1e-10)
    np.testing.assert_allclose(forces2, forces[order], atol=1e-10)


def test_forces_are_minus_finite_difference_gradient(molecule_model, apply_fn):
    potential, params = molecule_model
    atoms = ethanol()
    _, forces, _ = apply_fn(potential, params, atoms)
    h = 1e-5
    for atom, component in ((0, 0), (3, 1), (8, 2)):
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, component] += h
        minus.positions[atom, component] -= h
        derivative = (apply_fn(potential, params, plus)[0] - apply_fn(potential, params, minus)[0]) / (2 * h)
        assert -derivative == pytest.approx(forces[atom, component], rel=1e-6, abs=1e-7)


def small_triclinic_cell():
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True)
    atoms[1].symbol = "Au"
    cell = atoms.cell.array.copy()
    cell[1] += [0.3, 0.0, 0.0]
    cell[2] += [-0.2, 0.25, 0.0]
    atoms.set_cell(cell, scale_atoms=True)  # 3.7 Å wide: narrower than 2 r_c = 6 Å
    atoms.rattle(0.08, seed=4)
    return atoms


def test_stress_is_strain_derivative_on_small_triclinic_cell(bulk_model, apply_fn):
    potential, params = bulk_model
    atoms = small_triclinic_cell()
    _, _, stress = apply_fn(potential, params, atoms, stress=True)
    volume = atoms.get_volume()
    h = 1e-5
    for a, b in ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)):
        strain = np.zeros((3, 3))  # symmetric, d(strain)/dh has unit weight on σ_ab
        strain[a, b] = strain[b, a] = h if a == b else h / 2
        energies = []
        for sign in (1, -1):
            deformed = atoms.copy()
            deformed.set_cell(atoms.cell.array @ (np.eye(3) + sign * strain), scale_atoms=True)
            energies.append(apply_fn(potential, params, deformed, stress=True)[0])
        derivative = (energies[0] - energies[1]) / (2 * h * volume)
        assert derivative == pytest.approx(stress[a, b], rel=1e-5, abs=1e-9)
    assert np.abs(stress).max() > 1e-5


def test_periodic_images_equal_explicit_supercell(bulk_model, apply_fn):
    potential, params = bulk_model
    atoms = small_triclinic_cell()
    energy, forces, stress = apply_fn(potential, params, atoms, stress=True)
    supercell = atoms.repeat((2, 1, 2))
    energy4, forces4, stress4 = apply_fn(potential, params, supercell, stress=True)
    assert energy4 == pytest.approx(4 * energy, rel=1e-9)
    np.testing.assert_allclose(forces4[: len(atoms)], forces, atol=1e-9)
    np.testing.assert_allclose(stress4, stress, atol=1e-10)


def test_padding_and_batching_do_not_change_results(molecule_model, bulk_model):
    potential, params = bulk_model
    structures = [small_triclinic_cell(), small_triclinic_cell().repeat((1, 2, 1))]
    samples = build_samples([frame_of(a) for a in structures], potential.cutoff)
    apply = jax.jit(lambda p, g: potential.apply(p, g, True, True))
    alone = [jax.device_get(apply(params, pack_samples([s], None, None, np.float64))) for s in samples]
    big = PaddedSizes(n_node=64, n_edge=4096, n_graph=5)
    together = jax.device_get(apply(params, pack_samples(samples, big, None, np.float64)))
    offset = 0
    for g, (sample, single) in enumerate(zip(samples, alone)):
        assert together["energy"][g] == pytest.approx(single["energy"][0], rel=1e-12)
        np.testing.assert_allclose(together["forces"][offset:offset + sample.n_atoms],
                                   single["forces"][: sample.n_atoms], atol=1e-12)
        np.testing.assert_allclose(together["stress"][g], single["stress"][0], atol=1e-12)
        offset += sample.n_atoms
    assert np.all(together["energy"][2:] == 0) and np.all(together["forces"][offset:] == 0)


@pytest.mark.parametrize("backbone_name, settings", [("mace", {}), ("transformer", {"attention": "softmax"})])
def test_dense_and_list_edge_layouts_give_the_same_model(backbone_name, settings):
    """The dense [atoms, K] aggregation equals the scatter over an edge list (for MACE: e3nn's
    tensor product plus scatter): outputs, stress, and the parameter gradient of a force loss
    (what training differentiates)."""
    potential, params = make_potential([1, 6, 8, 29, 79], backbone_name=backbone_name, **settings)
    crystal = small_triclinic_cell().repeat((1, 2, 1))
    crystal.numbers[[0, 3]] = [8, 6]  # light elements in the cell too
    structures = [crystal, ethanol(), molecule("H2O")]
    samples = build_samples([frame_of(a) for a in structures], potential.cutoff)
    graphs = [pack_samples(samples, sizes_for(samples, 4, layout), None, np.float64)
              for layout in ("list", "dense")]
    assert graphs[0].neighbours_per_node == 0 and graphs[1].neighbours_per_node > 0

    def force_loss(p, graph):
        outputs = potential.apply(p, graph, True, True)
        return (outputs["forces"] ** 2).sum(), outputs

    evaluate = jax.jit(jax.value_and_grad(force_loss, has_aux=True))
    (_, as_list), grad_list = jax.device_get(evaluate(params, graphs[0]))
    (_, dense), grad_dense = jax.device_get(evaluate(params, graphs[1]))
    np.testing.assert_allclose(dense["energy"], as_list["energy"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dense["stress"], as_list["stress"], rtol=1e-10, atol=1e-12)
    n = sum(len(atoms) for atoms in structures)  # the list layout has one padding node more
    for key in ("forces", "node_energy"):
        np.testing.assert_allclose(dense[key][:n], as_list[key][:n], rtol=1e-10, atol=1e-12)
    assert np.abs(as_list["forces"]).max() > 1e-2  # a real signal, not zeros compared
    for a, b in zip(jax.tree.leaves(grad_dense), jax.tree.leaves(grad_list)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_energy_is_smooth_when_a_neighbour_crosses_the_cutoff(molecule_model, apply_fn):
    potential, params = molecule_model
    r_max = potential.cutoff

    def dimer(distance):
        return Atoms("CO", positions=[[0, 0, 0], [distance, 0, 0]])

    inside = apply_fn(potential, params, dimer(r_max - 1e-6))
    outside = apply_fn(potential, params, dimer(r_max + 1e-6))
    # No jump: the change is the work of the force over the 2e-6 Å step (zero for a local
    # model at r_c; the all-to-all block still sees the distance beyond it).
    assert outside[0] == pytest.approx(inside[0] - 2e-6 * inside[1][1, 0], abs=1e-9)
    np.testing.assert_allclose(inside[1], outside[1], atol=1e-6)


def test_envelope_values():
    x = np.array([0.0, 0.5, 1.0, 1.2])
    values = np.asarray(polynomial_envelope(x, 5))
    assert values[0] == 1.0 and values[2] == 0.0 and values[3] == 0.0
    derivative = jax.grad(lambda t: polynomial_envelope(t, 5))(1.0 - 1e-9)
    assert abs(derivative) < 1e-6


def test_far_apart_fragments_are_additive(model_name, molecule_model, apply_fn):
    if "all_to_all" in model_name:
        pytest.skip("all-to-all attention couples every atom of a structure by design")
    potential, params = molecule_model
    a, b = molecule("H2O"), molecule("CO")
    b.positions += [40.0, 0, 0]
    total = apply_fn(potential, params, a + b)[0]
    assert total == pytest.approx(apply_fn(potential, params, a)[0] + apply_fn(potential, params, b)[0],
                                  rel=1e-10)


def test_radial_mlp_blocks_match_e3nn_mlp():
    """RadialMLP: e3nn's MultiLayerPerceptron's parameters and values, its output in column blocks."""
    import e3nn_jax as e3nn

    from mlip.models.mace import RadialMLP

    radial = jax.random.normal(jax.random.PRNGKey(1), (7, 8))
    reference = e3nn.flax.MultiLayerPerceptron((16, 16, 10), act=jax.nn.silu, output_activation=False)
    blocked = RadialMLP((16, 16), (3, 5, 2))
    params = reference.init(jax.random.PRNGKey(0), radial)
    assert jax.tree.structure(blocked.init(jax.random.PRNGKey(0), radial)) == jax.tree.structure(params)
    blocks = blocked.apply(params, radial)
    assert [block.shape for block in blocks] == [(7, 3), (7, 5), (7, 2)]
    np.testing.assert_allclose(np.concatenate(blocks, axis=1), reference.apply(params, radial), rtol=1e-6, atol=1e-7)

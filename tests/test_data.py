"""Reading labelled data, neighbour lists, padding buckets and statistics."""

import json

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.neighborlist import neighbor_list

from mlip.data.batching import BatchIterator, PaddedSizes, build_samples, pack_samples, round_up_to_bucket, sizes_for
from mlip.data.neighbours import neighbour_list
from mlip.data.reader import LabelKeys, read_atoms, read_frames, split_data_spec
from mlip.data.statistics import compute_statistics, fit_e0_least_squares, load_e0_file
from mlip.errors import DataError


def _write(path, frames):
    ase.io.write(path, frames, format="extxyz")
    return str(path)


def test_reads_labels_under_any_key(tmp_path):
    atoms = molecule("H2O")
    atoms.info["dft_energy"] = -2075.5
    atoms.arrays["dft_forces"] = np.ones((3, 3))
    path = _write(tmp_path / "a.xyz", [atoms])
    frames = read_frames(path, LabelKeys(energy="dft_energy", forces="dft_forces"))
    assert frames[0].energy == -2075.5
    np.testing.assert_allclose(frames[0].forces, 1.0)


def test_at_most_reads_every_kth_frame_of_the_selection(tmp_path):
    # The uncertainty bias's reference structures: a stride over a large training file, which
    # for extended XYZ parses only the frames it keeps.
    frames = [Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7 + 0.01 * k]]) for k in range(30)]
    path = _write(tmp_path / "many.extxyz", frames)

    def lengths(images):
        return [round(float(atoms.positions[1, 2]), 2) for atoms in images]

    wanted = lengths(frames[2:29])[::6]  # 27 frames, at most 5: every 6th
    assert lengths(read_atoms(f"{path}@2:29", at_most=5)) == wanted
    assert lengths(read_atoms(f"{path}@2:29", at_most=50)) == lengths(frames[2:29])
    assert lengths(read_atoms(f"{path}@::-1", at_most=10)) == lengths(frames[::-1])[::3]
    ase.io.write(tmp_path / "many.traj", frames)  # a format read whole, then strided
    assert lengths(read_atoms(str(tmp_path / "many.traj"), at_most=7)) == lengths(frames)[::5]


def test_reads_plain_energy_from_ase_calculator_results(tmp_path):
    atoms = bulk("Cu", cubic=True)
    atoms.calc = SinglePointCalculator(atoms, energy=-12.0, forces=np.zeros((4, 3)),
                                       stress=np.arange(6.0))
    path = _write(tmp_path / "b.xyz", [atoms])
    frame = read_frames(path, LabelKeys(energy="energy", forces="forces", stress="stress"))[0]
    assert frame.energy == -12.0
    # Voigt (xx, yy, zz, yz, xz, xy) -> symmetric matrix
    np.testing.assert_allclose(frame.stress, [[0, 5, 4], [5, 1, 3], [4, 3, 2]])


def test_slices_and_frame_numbers_in_errors(tmp_path):
    frames = []
    for k in range(5):
        atoms = molecule("H2O")
        atoms.info["REF_energy"] = float(k)
        atoms.arrays["REF_forces"] = np.zeros((3, 3))
        frames.append(atoms)
    del frames[3].info["REF_energy"]
    path = _write(tmp_path / "c.xyz", frames)
    assert len(read_frames(f"{path}@0:3")) == 3
    assert [f.energy for f in read_frames(f"{path}@-1:")] == [4.0]
    with pytest.raises(DataError, match=r"c\.xyz@3: no energy under key 'REF_energy'"):
        read_frames(path)


def test_nan_label_and_bad_inputs_are_clear_errors(tmp_path):
    atoms = molecule("H2O")
    atoms.info["REF_energy"] = 1.0
    forces = np.zeros((3, 3))
    forces[2, 1] = np.nan
    atoms.arrays["REF_forces"] = forces
    path = _write(tmp_path / "d.xyz", [atoms])
    with pytest.raises(DataError, match="not finite on atom 2"):
        read_frames(path)
    with pytest.raises(DataError, match="file not found"):
        read_frames(str(tmp_path / "missing.xyz"))
    with pytest.raises(DataError, match="no frames"):
        read_frames(f"{path}@5:9")
    with pytest.raises(DataError, match="empty index"):
        split_data_spec(f"{path}@")


def test_non_periodic_frame_with_cell_is_treated_as_molecule(tmp_path):
    atoms = molecule("CH4")
    atoms.cell = [10, 10, 10]
    atoms.pbc = False
    atoms.info["REF_energy"] = 0.0
    atoms.arrays["REF_forces"] = np.zeros((5, 3))
    frame = read_frames(_write(tmp_path / "e.xyz", [atoms]))[0]
    graph = pack_samples(build_samples([frame], 3.0))
    assert not frame.is_periodic
    assert np.all(graph.cell == 0)


def test_neighbour_list_matches_ase_on_small_triclinic_cell():
    atoms = bulk("Cu", "fcc", a=3.6)  # 1-atom cell, much smaller than 2 r_c: self-images
    cell = atoms.cell.array.copy()
    cell[2] += [0.4, -0.3, 0.0]
    atoms.set_cell(cell)
    atoms = atoms.repeat((2, 1, 1))
    atoms.rattle(0.05, seed=3)
    atoms.positions += 7.0  # outside the cell
    senders, receivers, shifts = neighbour_list(atoms.positions, atoms.cell.array, atoms.pbc, 5.0)
    i, j, S = neighbor_list("ijS", atoms, 5.0)
    ours = sorted(map(tuple, np.round(np.c_[receivers, senders, atoms.positions[senders]
                                            + shifts @ atoms.cell.array - atoms.positions[receivers]], 8)))
    reference = sorted(map(tuple, np.round(np.c_[i, j, atoms.positions[j] + S @ atoms.cell.array
                                                 - atoms.positions[i]], 8)))
    assert ours == reference
    assert np.any((senders == receivers) & np.any(shifts != 0, axis=1))  # own images kept


def test_shift_sign_convention_two_atoms_through_boundary():
    # Atom 1 at x = 9.5 sees atom 0 (x = 0.5) only through the boundary: r_10 = +1 Å.
    positions = np.array([[0.5, 0, 0], [9.5, 0, 0]])
    cell = np.diag([10.0, 10.0, 10.0])
    senders, receivers, shifts = neighbour_list(positions, cell, np.array([True] * 3), 1.5)
    edge = int(np.flatnonzero((receivers == 1) & (senders == 0))[0])
    vector = positions[senders[edge]] + shifts[edge] @ cell - positions[receivers[edge]]
    np.testing.assert_allclose(vector, [1.0, 0, 0])


def test_bucket_ladder_is_monotone_and_bounded():
    values = [round_up_to_bucket(n) for n in range(1, 5000)]
    assert all(b >= n for n, b in zip(range(1, 5000), values))
    assert values == sorted(values)
    assert max(b / n for n, b in zip(range(8, 5000), values[7:])) <= 1.25 + 1e-9
    assert len(set(values)) < 40  # bounded number of shapes over three decades


@pytest.mark.parametrize("layout", ["list", "dense"])
def test_padding_layout(layout):
    frames = read_frames_from_atoms([molecule("H2O"), molecule("CH4")])
    samples = build_samples(frames, 3.0)
    sizes = sizes_for(samples, 4, layout)
    graph = pack_samples(samples, sizes)
    assert graph.positions.shape == (sizes.n_node, 3) and graph.n_node.shape == (4,)
    assert graph.node_mask.sum() == 8 and graph.graph_mask.tolist() == [True, True, False, False]
    assert graph.n_node.sum() == sizes.n_node and graph.n_edge.sum() == sizes.n_edge
    assert graph.edge_mask.sum() == sum(s.n_edges for s in samples)
    padding = ~graph.edge_mask
    assert np.all(graph.senders[padding] == graph.receivers[padding]) and not graph.shifts[padding].any()
    if layout == "list":
        assert graph.neighbours_per_node == 0
        assert not graph.node_mask[graph.receivers[padding]].any()
    else:  # receiver-major: K slots per node, CH4's carbon has the most neighbours (4)
        k = graph.neighbours_per_node
        assert k == 4 and sizes.n_edge == sizes.n_node * k
        np.testing.assert_array_equal(graph.receivers, np.repeat(np.arange(sizes.n_node), k))


def test_dense_and_list_layouts_hold_the_same_edges():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 1)
    atoms.rattle(0.1, seed=1)
    samples = build_samples(read_frames_from_atoms([atoms, molecule("CH3CH2OH")]), 4.0)
    graphs = [pack_samples(samples, sizes_for(samples, 3, layout)) for layout in ("list", "dense")]

    def edge_set(graph):
        mask = graph.edge_mask
        return sorted(zip(graph.receivers[mask], graph.senders[mask], *graph.shifts[mask].T))

    assert edge_set(graphs[0]) == edge_set(graphs[1])
    assert [s.max_neighbours for s in samples] == [18, 8]  # fcc to the second shell; ethanol: all
    assert graphs[1].neighbours_per_node == 20  # 18 on the ladder
    # auto takes the dense layout unless its slots outnumber the list's edges more than 2:1
    assert sizes_for(samples, 3).neighbours_per_node == 20
    waters = build_samples(read_frames_from_atoms([molecule("H2O")]), 4.0) * 20
    assert sizes_for(waters + samples[:1], 22).neighbours_per_node == 0
    with pytest.raises(ValueError, match="does not fit"):  # fewer slots than an atom's neighbours
        pack_samples(samples, PaddedSizes.dense(32, 16, 3))


@pytest.mark.parametrize("layout", ["auto", "list"])
def test_short_last_batch_takes_a_full_batch_shape(layout):
    samples = build_samples(read_frames_from_atoms([molecule("CH4")] * 13 + [molecule("H2O")] * 2), 3.0)
    iterator = BatchIterator(samples, 4, layout=layout)
    for seed in range(10):
        batches = list(iterator.batches(seed))
        full_shapes = {graph.positions.shape + graph.senders.shape for graph, indices in batches if len(indices) == 4}
        last, indices = batches[-1]
        assert len(indices) == 3 and last.positions.shape + last.senders.shape in full_shapes
        assert last.node_mask.sum() == sum(samples[i].n_atoms for i in indices)
        assert sorted(i for _, chunk in batches for i in chunk) == list(range(15))


def test_rare_small_batches_are_padded_to_a_common_shape():
    # batches of 4 from 37 CH4 and 3 H2O: 20 atoms, 18 (one water; the same bucket, 20) or,
    # in 3 of 400 batches, 16 or less (two waters or more): a shape of its own without the floor
    samples = build_samples(read_frames_from_atoms([molecule("CH4")] * 37 + [molecule("H2O")] * 3), 3.0)
    iterator = BatchIterator(samples, 4)
    assert iterator.floor[0] == 20

    def node_counts(batches):
        return {graph.positions.shape[0] for seed in range(40) for graph, _ in batches.batches(seed)}

    assert node_counts(iterator) == {20}
    iterator.floor = (0, 0)
    assert node_counts(iterator) == {16, 20}


def read_frames_from_atoms(images):
    from mlip.data.reader import atoms_to_frame

    return [atoms_to_frame(a, LabelKeys(energy=None, forces=None), f"mem@{k}") for k, a in enumerate(images)]


def test_e0_least_squares_is_exact_on_additive_data():
    rng = np.random.default_rng(0)
    e0 = {1: -13.6, 6: -1030.5, 8: -2040.1}
    images = []
    for _ in range(12):
        numbers = rng.choice([1, 6, 8], size=int(rng.integers(2, 7)))
        atoms = Atoms(numbers=numbers, positions=rng.normal(size=(len(numbers), 3)) * 3)
        images.append(atoms)
    frames = read_frames_from_atoms(images)
    for frame in frames:
        frame.energy = sum(e0[int(z)] for z in frame.numbers)
    fitted = fit_e0_least_squares(build_samples(frames, 2.0), [1, 6, 8])
    for z in e0:
        assert fitted[z] == pytest.approx(e0[z], abs=1e-6)
    stats = compute_statistics(build_samples(frames, 2.0))
    assert abs(stats.shift) < 1e-6


def test_e0_file_accepts_symbols_and_numbers(tmp_path):
    path = tmp_path / "e0.json"
    path.write_text(json.dumps({"H": -13.6, "8": -2040.0}))
    assert load_e0_file(str(path)) == {1: -13.6, 8: -2040.0}
    path.write_text(json.dumps({"Xx": 1.0}))
    with pytest.raises(DataError, match="'Xx'"):
        load_e0_file(str(path))


def test_statistics_normalise_large_absolute_energies(emt_file):
    frames = read_frames(emt_file)
    samples = build_samples(frames, 5.0)
    stats = compute_statistics(samples)
    table = stats.e0_per_species()
    residual = [(f.energy - table[f.numbers].sum()) / f.n_atoms - stats.shift for f in frames]
    assert np.max(np.abs(residual)) < 1.0  # the raw labels are ~ +250 eV/atom
    forces = np.concatenate([f.forces for f in frames])
    assert stats.scale == pytest.approx(np.sqrt(np.mean(forces**2)))
    assert 10 < stats.avg_num_neighbors < 80


def test_md17_and_md22_npz_are_read_in_ev(tmp_path):
    kcal = 0.0433641043
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(5, 3, 3))
    energies = np.array([-1000.0, -1000.5, -1001.0, -999.0, -1000.2])  # kcal/mol
    forces = rng.normal(size=(5, 3, 3))
    np.savez(tmp_path / "rmd17_water.npz", nuclear_charges=np.array([8, 1, 1]), coords=coords, energies=energies,
             forces=forces)
    np.savez(tmp_path / "md22_water.npz", z=np.array([8, 1, 1]), R=coords, E=energies[:, None], F=forces,
             e_unit=np.array("kcal/mol"), r_unit=np.array("Ang"))
    for name in ("rmd17_water.npz", "md22_water.npz"):
        frames = read_frames(f"{tmp_path / name}@1:4")
        assert [f.source for f in frames] == [f"{tmp_path / name}@{i}" for i in (1, 2, 3)]
        assert frames[0].energy == pytest.approx(-1000.5 * kcal)
        np.testing.assert_allclose(frames[2].forces, forces[3] * kcal)
        np.testing.assert_allclose(frames[1].positions, coords[2])
        assert list(frames[0].numbers) == [8, 1, 1] and not frames[0].is_periodic
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(DataError, match="rMD17 keys"):
        read_frames(str(tmp_path / "other.npz"))


def test_isolated_atoms_give_reference_energies_from_the_training_file_or_their_own(tmp_path, capsys):
    from mlip.training.config import config_from_dict
    from mlip.training.trainer import describe_data, load_split, resolve_e0s

    frames = []
    for symbol, energy in (("H", -13.6), ("O", -2040.0)):
        atom = Atoms(symbol)
        atom.info.update(REF_energy=energy, config_type="IsolatedAtom")
        atom.arrays["REF_forces"] = np.zeros((1, 3))
        frames.append(atom)
    for k in range(6):
        water = molecule("H2O")
        water.rattle(0.05, seed=k)
        water.info["REF_energy"] = -2068.0 - 0.1 * k
        water.arrays["REF_forces"] = np.zeros((3, 3))
        frames.append(water)
    path = _write(tmp_path / "train.extxyz", frames)
    config = config_from_dict({"data": {"train": path}, "run_dir": str(tmp_path / "run")}, "test")
    train, valid, isolated = load_split(config)
    assert len(isolated) == 2 and len(train) + len(valid) == 6
    assert all(f.n_atoms == 3 for f in train + valid)
    e0, source = resolve_e0s(config, isolated)
    assert e0 == {1: -13.6, 8: -2040.0} and "isolated-atom frames" in source
    statistics = compute_statistics(build_samples(train, 3.0), e0)
    text = describe_data(train, valid, statistics, source)
    assert "elements H 10, O 5" in text and "E0 (isolated-atom frames" in text and "O -2040" in text

    # A separate file of isolated atoms (extxyz), and its mistakes.
    _write(tmp_path / "atoms.extxyz", frames[:2])
    assert load_e0_file(str(tmp_path / "atoms.extxyz")) == {1: -13.6, 8: -2040.0}
    _write(tmp_path / "bad.extxyz", frames[:3])
    with pytest.raises(DataError, match=r"bad.extxyz@2: an isolated-atom frame .* must hold one atom"):
        load_e0_file(str(tmp_path / "bad.extxyz"))


def test_plain_ase_labels_are_used_when_the_configured_key_is_absent(tmp_path, capsys):
    atoms = molecule("H2O")
    atoms.calc = SinglePointCalculator(atoms, energy=-2070.0, forces=np.full((3, 3), 0.5))
    path = _write(tmp_path / "plain.extxyz", [atoms, atoms])
    frames = read_frames(path)  # default keys REF_energy, REF_forces
    assert frames[1].energy == -2070.0 and np.all(frames[1].forces == 0.5)
    err = capsys.readouterr().err
    assert err.count("using ASE's plain 'energy'") == 1 and err.count("plain 'forces'") == 1

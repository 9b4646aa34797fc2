"""The shipped data sets and configs load and validate as the README promises."""

import glob
import os

import numpy as np
import pytest

from mlip.data.reader import read_frames
from mlip.data.statistics import load_e0_file
from mlip.training.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("config", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_shipped_configs_validate(config, monkeypatch):
    if os.path.basename(config).startswith("active_learning"):  # oracle, seeds, training
        import importlib.util

        from mlip.active.config import load_active_learning_config
        from mlip.active.learner import ActiveLearner

        monkeypatch.chdir(ROOT)
        oracle = load_active_learning_config(config).oracle.calculator
        if importlib.util.find_spec(oracle.rpartition(".")[0].split(".")[0]) is None:
            return  # tblite is an optional dependency (the `data` extra): the config itself validated
        ActiveLearner.from_file(config)
        return
    load_config(config)


def test_shipped_data_has_labels_and_stress():
    ethanol = read_frames(os.path.join(ROOT, "data", "ethanol_gfn2_500K.extxyz@0:20"))
    assert len(ethanol) == 20 and not ethanol[0].is_periodic
    assert ethanol[0].energy < -300  # absolute GFN2-xTB energies, eV
    metal = read_frames(os.path.join(ROOT, "data", "cuau_emt.extxyz@:10"))
    assert all(f.stress is not None and f.is_periodic for f in metal)
    assert np.allclose(metal[0].stress, metal[0].stress.T)
    e0 = load_e0_file(os.path.join(ROOT, "data", "ethanol_gfn2_e0s.json"))
    assert set(e0) == {1, 6, 8}


def test_shipped_cuau_surfaces_set_is_laid_out_as_its_config_reads_it():
    """Seeds 0-3 (one per kind), test 4-67 and spare 68-131: 8 frames per kind and temperature each."""
    import collections

    import ase.io

    atoms = ase.io.read(os.path.join(ROOT, "data", "cuau_surfaces_emt.extxyz"), ":")
    kinds = ["bulk", "slab111_adatom", "slab100", "cluster"]
    assert [a.info["config_type"] for a in atoms[:4]] == [f"seed_{kind}" for kind in kinds]
    for use, frames in (("test", atoms[4:68]), ("spare", atoms[68:])):
        counts = collections.Counter(a.info["config_type"] for a in frames)
        assert counts == {f"{use}_{kind}_{t}K": 8 for kind in kinds for t in (300, 1000)}
    cluster = read_frames(os.path.join(ROOT, "data", "cuau_surfaces_emt.extxyz@3"))[0]
    assert not cluster.is_periodic and len(cluster.numbers) == 13  # a cell in the file, not periodic


def test_shipped_long_range_data_carries_charges_and_same_geometry_pairs():
    ions = read_frames(os.path.join(ROOT, "data", "ion_pairs_gfn2.extxyz"))
    assert len(ions) == 600 and {f.charge for f in ions} == {-1.0, 0.0, 1.0}
    assert {f.spin for f in ions} == {1.0, 2.0}
    import ase.io

    separations = np.array([a.info["separation"] for a in ase.io.read(os.path.join(ROOT, "data",
                                                                                   "ion_pairs_gfn2.extxyz"), ":")])
    assert separations.min() < 4.0 and separations.max() > 10.0 and np.mean(separations > 5.0) > 0.5
    cells = read_frames(os.path.join(ROOT, "data", "nacl_defects_gfn2.extxyz"))
    assert all(f.is_periodic and f.stress is not None for f in cells)
    assert {f.charge for f in cells} == {-1.0, 0.0, 1.0}
    assert set(load_e0_file(os.path.join(ROOT, "data", "long_range_gfn2_e0s.json"))) == {1, 8, 11, 17}


def test_shipped_extrapolation_set_trains_in_trans_and_scans_every_barrier():
    import ase.io

    train = ase.io.read(os.path.join(ROOT, "data", "butane_gfn2_300K.extxyz"), ":")
    assert len(train) == 600 and all(abs(a.get_dihedral(0, 1, 2, 3) - 180) < 60 for a in train)
    scans = ase.io.read(os.path.join(ROOT, "data", "butane_gfn2_torsions.extxyz"), ":")
    for name in ("scan_CCCC", "scan_HCCC"):
        points = [a for a in scans if a.info["scan"] == name]
        assert [a.info["dihedral"] for a in points] == list(range(0, 360, 10))
        assert all("REF_energy" in a.info and a.arrays["REF_forces"].shape == (14, 3) for a in points)
    cis = next(a for a in scans if a.info["scan"] == "scan_CCCC" and a.info["dihedral"] == 0)
    assert abs(cis.get_dihedral(0, 1, 2, 3) % 360) < 1e-3 or abs(cis.get_dihedral(0, 1, 2, 3) - 360) < 1e-3
    assert set(load_e0_file(os.path.join(ROOT, "data", "butane_gfn2_e0s.json"))) == {1, 6}


def test_shipped_gfn1_labels_are_the_same_geometries_at_another_level():
    from mlip.data.reader import LabelKeys, assign_fidelities

    keys = LabelKeys(fidelity="level_of_theory")
    cheap = read_frames(os.path.join(ROOT, "data", "ethanol_gfn1_500K.extxyz@0:20"), keys)
    dear = read_frames(os.path.join(ROOT, "data", "ethanol_gfn2_500K.extxyz@0:20"))
    assert len(read_frames(os.path.join(ROOT, "data", "ethanol_gfn1_500K.extxyz"))) == 1000
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(cheap, dear))
    difference = np.concatenate([a.forces - b.forces for a, b in zip(cheap, dear)])
    assert 0.02 < np.abs(difference).mean() < 0.3  # another method, not a copy
    assign_fidelities(cheap, ("gfn1", "gfn2"), tag_key="level_of_theory")  # tagged in atoms.info
    assert {f.fidelity for f in cheap} == {0}
    assert set(load_e0_file(os.path.join(ROOT, "data", "ethanol_gfn1_e0s.json"))) == {1, 6, 8}

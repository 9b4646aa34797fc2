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
def test_shipped_configs_validate(config):
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

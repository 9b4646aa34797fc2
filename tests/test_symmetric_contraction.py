"""The monomial-basis symmetric contraction equals the dense-U reference and is equivariant."""

import e3nn_jax as e3nn
import numpy as np
import pytest

from mlip.models.symmetric_contraction import SymmetricContraction
from reference_symmetric_contraction import SymmetricContraction as DenseSymmetricContraction


@pytest.mark.parametrize("irreps, correlation, keep", [("0e + 1o + 2e + 3o", 3, "0e + 1o"),
                                                        ("0e + 1o + 2e", 2, "0e"),
                                                        ("0e + 1o", 3, "0e + 1o + 2e")])
def test_matches_dense_reference(irreps, correlation, keep, keys):
    features = e3nn.normal(irreps, next(keys), (5, 3))  # [N=5, C=3, irreps]
    species = np.array([0, 1, 1, 0, 1])
    fast = SymmetricContraction(correlation, keep, 2)
    params = fast.init(next(keys), features, species)
    dense = DenseSymmetricContraction(correlation, keep, 2)
    expected = dense.apply(params, features, species)
    got = fast.apply(params, features, species)
    assert got.irreps == expected.irreps
    np.testing.assert_allclose(got.array, expected.array, rtol=1e-9, atol=1e-10)


def test_equivariant(keys):
    module = SymmetricContraction(3, "0e + 1o + 2e", 1)
    features = e3nn.normal("0e + 1o + 2e + 3o", next(keys), (4, 2))
    species = np.zeros(4, np.int32)
    params = module.init(next(keys), features, species)
    e3nn.utils.assert_equivariant(lambda x: module.apply(params, x, species), next(keys),
                                  features, atol=1e-9)

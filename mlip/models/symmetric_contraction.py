"""MACE's symmetric contraction: many-body features from the atomic basis A_i.

For each channel c of each node i, with per-channel irreps features x = A_ic (dim D),

    B_ic = Σ_{ν ≤ correlation} Σ_k w^(ν)_{Z_i,k,c} · U^(ν)_k ⋅ (x ⊗ ... ⊗ x)   (ν copies)

where U^(ν) is the generalised Clebsch–Gordan basis of the *symmetric* ν-th tensor
power coupled to each output irrep (e3nn's ``reduced_symmetric_tensor_product_basis``).

Because U^(ν) is symmetric in its ν tensor indices, U ⋅ x^⊗ν only needs the distinct
monomials x_a x_b x_c (a ≤ b ≤ c), each weighted by its number of orderings. We
build that reduced matrix Ū once on the host, drop monomials that no kept irrep
uses, and evaluate all orders with one dense matmul: ~1 % of U is non-zero, so this
is several times cheaper than contracting the dense U tensor (ACEsuit/mace's route)
while giving the same numbers (tests/reference_symmetric_contraction.py checks it).

References:
    Batatia et al., "MACE: Higher order equivariant message passing neural networks
    for fast and accurate force fields", NeurIPS 2022, arXiv:2206.07697.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from math import factorial

import e3nn_jax as e3nn
import flax.linen as nn
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def monomial_basis(irreps_in: str, correlation: int, keep_irrep_out: str):
    """Host-side tables for the contraction (cached per irreps and correlation).

    Returns:
        monomials: list over orders ν of int arrays [P_ν, ν] of tensor indices a ≤ b ≤ ...
        matrices: list over orders of float64 arrays [P_ν, Q_ν], Ū flattened over
            (output irrep, multiplicity, irrep component).
        layouts: list over orders of tuples (ir_out, mul, column offset).
    """
    irreps = e3nn.Irreps(irreps_in)
    keep = {e3nn.Irrep(ir) for _, ir in e3nn.Irreps(keep_irrep_out)}
    dim = irreps.dim
    monomials, matrices, layouts = [], [], []
    for order in range(1, correlation + 1):
        basis = e3nn.reduced_symmetric_tensor_product_basis(irreps, order, keep_ir=keep)
        combos = np.array(list(itertools.combinations_with_replacement(range(dim), order)), np.int64)
        orderings = np.array([factorial(order) / np.prod([factorial(n) for n in Counter(c).values()])
                              for c in combos.tolist()])
        columns, layout, offset = [], [], 0
        for (mul, ir_out), chunk in zip(basis.irreps, basis.chunks):
            u = np.asarray(chunk, np.float64)  # [D]*order + [mul, ir.dim]
            values = u[tuple(combos.T)]  # [P, mul, ir.dim]
            columns.append((values * orderings[:, None, None]).reshape(len(combos), -1))
            layout.append((ir_out, mul, offset))
            offset += mul * ir_out.dim
        matrix = np.concatenate(columns, axis=1) if columns else np.zeros((len(combos), 0))
        used = np.abs(matrix).max(axis=1) > 1e-12 if matrix.size else np.zeros(len(combos), bool)
        monomials.append(combos[used])
        matrices.append(matrix[used])
        layouts.append(tuple(layout))
    return monomials, matrices, layouts


def _one_hot_columns(indices: np.ndarray, dim: int) -> np.ndarray:
    """[dim, P] matrix whose column p selects component indices[p]."""
    selector = np.zeros((dim, len(indices)))
    selector[indices, np.arange(len(indices))] = 1.0
    return selector


class SymmetricContraction(nn.Module):
    """Species-dependent symmetric tensor powers of per-channel irreps features.

    Attributes:
        correlation: highest tensor power ν (body order ν + 1 per layer).
        keep_irrep_out: irreps (multiplicity 1) kept in the output, e.g. "0e + 1o".
        num_species: number of elements; weights are indexed by element.
    """

    correlation: int
    keep_irrep_out: str
    num_species: int

    @nn.compact
    def __call__(self, features: e3nn.IrrepsArray, species_index: jnp.ndarray) -> e3nn.IrrepsArray:
        """features: [N, C, irreps] (multiplicity-1 irreps per channel); species_index: [N].

        Returns [N, C, irreps_out].
        """
        assert features.ndim == 3, features.shape
        monomials, matrices, layouts = monomial_basis(
            str(features.irreps), self.correlation, str(e3nn.Irreps(self.keep_irrep_out)))
        x = features.array  # [N, C, D]
        num_nodes, num_channels = x.shape[:2]
        out: dict = {}
        for order, (combos, matrix, layout) in enumerate(zip(monomials, matrices, layouts), start=1):
            if not layout or len(combos) == 0:
                continue
            # Selecting factors with one-hot matmuls rather than gathers: on CPU the
            # scatter-add in the gradient of a gather is far slower than a matmul.
            products = x @ jnp.asarray(_one_hot_columns(combos[:, 0], x.shape[-1]), x.dtype)  # [N, C, P]
            for t in range(1, order):
                products = products * (x @ jnp.asarray(_one_hot_columns(combos[:, t], x.shape[-1]), x.dtype))
            coupled = products @ jnp.asarray(matrix, x.dtype)  # [N, C, Q]
            for ir_out, mul, offset in layout:
                weights = self.param(f"w{order}_{ir_out}", nn.initializers.normal(stddev=1.0),
                                     (self.num_species, mul, num_channels), x.dtype)
                w = weights[species_index] * mul**-0.5  # [N, mul, C]
                block = coupled[:, :, offset:offset + mul * ir_out.dim].reshape(
                    num_nodes, num_channels, mul, ir_out.dim)
                term = jnp.einsum("ncmi,nmc->nci", block, w)
                out[ir_out] = out[ir_out] + term if ir_out in out else term
        irreps_out = e3nn.Irreps(sorted(out.keys()))
        return e3nn.from_chunks(irreps_out, [out[ir][:, :, None, :] for _, ir in irreps_out],
                                x.shape[:2], x.dtype)


def irreps_up_to(max_l: int, num_channels: int = 1) -> e3nn.Irreps:
    """``num_channels x (0e + 1o + 2e + ...)`` up to ``max_l`` with parity (−1)^l."""
    return e3nn.Irreps([(num_channels, (l, (-1) ** l)) for l in range(max_l + 1)])

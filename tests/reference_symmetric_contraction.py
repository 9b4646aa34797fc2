"""Reference (dense-U) symmetric contraction, kept to check the fast one numerically.

This is the straightforward port of ACEsuit/mace-jax's contraction that mlip used first.

For each channel c of each node, computes the element-dependent linear combination

    B_ic = Σ_ν Σ_k w^(ν)_{Z_i, k c} · U^(ν)_k ⋅ (A_ic ⊗ ... ⊗ A_ic)   (ν copies, ν ≤ correlation)

where U^(ν) is the generalised Clebsch–Gordan basis of the symmetric ν-th tensor
power of the per-channel irreps, coupled to each output irrep. The contraction runs
from the highest order down, ``((w3 A + w2) A + w1) A``, as in ACEsuit/mace and
e3nn-jax's ``SymmetricTensorProduct``.

References:
    Batatia et al., "MACE: Higher order equivariant message passing neural networks
    for fast and accurate force fields", NeurIPS 2022, arXiv:2206.07697.
"""

from __future__ import annotations


import e3nn_jax as e3nn
import flax.linen as nn
import jax.numpy as jnp


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
        keep = {e3nn.Irrep(ir) for _, ir in e3nn.Irreps(self.keep_irrep_out)}
        x = features.array  # [N, C, D]
        num_channels = x.shape[1]
        out: dict = {}
        for order in range(self.correlation, 0, -1):
            basis = e3nn.reduced_symmetric_tensor_product_basis(features.irreps, order, keep_ir=keep)
            for (mul, ir_out), u in zip(basis.irreps, basis.chunks):
                u = u.astype(x.dtype)  # [D]*order + [mul, ir_out.dim]
                weights = self.param(f"w{order}_{ir_out}", nn.initializers.normal(stddev=1.0),
                                     (self.num_species, mul, num_channels), x.dtype)
                w = weights[species_index] * mul**-0.5  # [N, mul, C]
                if ir_out not in out:
                    # highest order of this irrep: contract the last tensor index with x now
                    out[ir_out] = ("fresh", jnp.einsum("...jki,nkc,ncj->nc...i", u, w, x))
                else:
                    out[ir_out] = out[ir_out] + jnp.einsum("...ki,nkc->nc...i", u, w)
            for ir_out in list(out):
                if isinstance(out[ir_out], tuple):
                    out[ir_out] = out[ir_out][1]
                    continue
                out[ir_out] = jnp.einsum("nc...ji,ncj->nc...i", out[ir_out], x)
        irreps_out = e3nn.Irreps(sorted(out.keys()))
        return e3nn.from_chunks(irreps_out, [out[ir][:, :, None, :] for _, ir in irreps_out],
                                x.shape[:2], x.dtype)


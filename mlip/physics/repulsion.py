"""Short-range nuclear repulsion (ZBL universal potential), added to any model's energy.

A model trained near equilibrium has never seen two nuclei at 0.5 Å; in hot MD or a
bond about to break it may let them fuse. The Ziegler–Biersack–Littmark screened
Coulomb repulsion gives the right physics there at no cost in parameters:

    E_ij = k_e Z_i Z_j / r · φ(r/a) · u_p(r/r_c),    a = 0.8854 a₀ / (Z_i^0.23 + Z_j^0.23)
    φ(x) = 0.1818 e^{−3.2 x} + 0.5099 e^{−0.9423 x} + 0.2802 e^{−0.4029 x} + 0.02817 e^{−0.2016 x}

with u_p the polynomial envelope that takes it smoothly to zero at r_c = the sum of the
two covalent radii (as MACE's ZBL basis; capped at the model's cutoff, within which the
neighbour list is). Half of each pair's energy goes to each atom, so per-atom energies
sum to the total. The model then learns the remainder.

Reference: Ziegler, Biersack & Littmark, The Stopping and Range of Ions in Solids (1985).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from ase.data import covalent_radii

from mlip.geometry import padded_edge_vectors, polynomial_envelope, sum_at_receivers
from mlip.graph import AtomsGraph
from mlip.physics.ewald import COULOMB_CONSTANT

BOHR = 0.52917721  # Å
ZBL_COEFFICIENTS = (0.1818, 0.5099, 0.2802, 0.02817)
ZBL_EXPONENTS = (3.2, 0.9423, 0.4029, 0.2016)


def zbl_pair_energy(lengths: jnp.ndarray, z_i: jnp.ndarray, z_j: jnp.ndarray) -> jnp.ndarray:
    """Unscreened-by-envelope ZBL energy (eV) of pairs at distances ``lengths`` (Å)."""
    z_i, z_j = z_i.astype(lengths.dtype), z_j.astype(lengths.dtype)
    screening_length = 0.8854 * BOHR / (z_i**0.23 + z_j**0.23)
    x = lengths / screening_length
    phi = sum(c * jnp.exp(-e * x) for c, e in zip(ZBL_COEFFICIENTS, ZBL_EXPONENTS))
    return COULOMB_CONSTANT * z_i * z_j / lengths * phi


class ZBLRepulsion(nn.Module):
    """[N] ZBL energies per atom (eV) over the graph's edges; no parameters.

    Attributes:
        r_max: the model's cutoff, Å (the neighbour list's radius).
        envelope_p: order of the polynomial envelope.
    """

    r_max: float
    envelope_p: int = 6

    @nn.compact
    def __call__(self, graph: AtomsGraph, positions: jnp.ndarray, cell: jnp.ndarray) -> jnp.ndarray:
        dtype = positions.dtype
        lengths = jnp.linalg.norm(padded_edge_vectors(positions, cell, graph, self.r_max), axis=-1)
        z_i, z_j = graph.species[graph.receivers], graph.species[graph.senders]
        radii = jnp.asarray(covalent_radii, dtype)
        r_cut = jnp.minimum(radii[z_i] + radii[z_j], self.r_max)
        inside = graph.edge_mask & (lengths < r_cut)
        safe = jnp.where(inside, lengths, r_cut)  # no 1/r of a padding edge, even in the gradient
        pair = 0.5 * zbl_pair_energy(safe, jnp.maximum(z_i, 1), jnp.maximum(z_j, 1)) * polynomial_envelope(
            safe / r_cut, self.envelope_p)
        energy = sum_at_receivers(jnp.where(inside, pair, 0.0), graph, positions.shape[0])
        return jnp.where(graph.node_mask, energy, 0.0)


__all__ = ["ZBLRepulsion", "zbl_pair_energy"]

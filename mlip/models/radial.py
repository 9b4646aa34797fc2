"""Radial edge embedding: Bessel basis times the polynomial cutoff envelope.

    B_n(r) = sqrt(2/r_c) sin(nπ r/r_c) / r,     u_p(x) = 1 − (p+1)(p+2)/2 x^p
             + p(p+2) x^(p+1) − p(p+1)/2 x^(p+2),   x = r/r_c, u = 0 for x ≥ 1

u, u' and u'' vanish at r_c, so energies, forces and their derivatives are continuous
when a neighbour crosses the cutoff (METHODS.md §1.1).
"""

from __future__ import annotations

import e3nn_jax as e3nn
import jax.numpy as jnp

from mlip.geometry import polynomial_envelope


def radial_embedding(lengths: jnp.ndarray, r_max: float, num_basis: int, envelope_p: int) -> jnp.ndarray:
    """[E] lengths (Å) -> [E, num_basis] Bessel features that vanish smoothly at r_max."""
    basis = e3nn.bessel(lengths, num_basis, x_max=r_max)  # finite at r = 0
    return basis * polynomial_envelope(lengths / r_max, envelope_p)[:, None]

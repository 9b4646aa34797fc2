"""Smooth particle-mesh Ewald (Essmann et al. 1995): the reciprocal sum in O(N log N) for large cells.

The structure factor S(k) = Σ_j q_j e^{ik·r_j} is approximated by spreading the charges
onto a regular mesh of the cell with cardinal B-splines of order p and one FFT:

    Q(x) = Σ_j q_j Π_a M_p(u_ja − x_a),   u_j = K ⊙ (r_j · cell⁻¹)   (mesh coordinates)
    |S(m)|² ≈ B(m) |FFT(Q)(m)|²,           B(m) = Π_a |Σ_{k=0}^{p−2} M_p(k+1) e^{2πi m_a k/K_a}|⁻²

and the energy E = (2π k_e/V) Σ_{m≠0, |k|≤k_c} e^{−k²/4α²}/k² |S(m)|² (k = 2π m·cell⁻ᵀ, the
same sum as `mlip.physics.ewald.reciprocal_energy`) becomes E = Σ_x Q(x) Φ(x) with Φ the
inverse FFT of the filtered FFT(Q). Per atom, e_i = q_i Σ_x w_i(x) Φ(x) (the same
spline weights), so Σ_i e_i = E. Forces and stress come from autodiff through the
spline weights and the cell. The cost is N p³ for spreading and K log K for the FFTs,
against N·M for the direct sum over M k vectors (M ∝ N at fixed density).

The mesh shape is static (part of the jit cache key); `mlip.data.neighbours.mesh_shape_for`
picks it on the host from the largest k index a batch needs, oversampled so that the spline error stays
small (tests: energy and forces within 1e-4 relative of the direct sum).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mlip.data.neighbours import SPLINE_ORDER  # the host sizes the mesh for this order


def _cardinal_bspline(x, order: int, xp=jnp):
    """M_p(x), the cardinal B-spline of order p (support (0, p)), by its recursion (``xp``: jnp or np)."""
    # M_2(x) = 1 − |x − 1| on [0, 2]; M_n(x) = [x M_{n−1}(x) + (n − x) M_{n−1}(x − 1)]/(n − 1).
    def spline(y, n):
        if n == 2:
            return xp.maximum(1.0 - xp.abs(y - 1.0), 0.0)
        return (y * spline(y, n - 1) + (n - y) * spline(y - 1.0, n - 1)) / (n - 1)

    return spline(x, order)


def _spline_moduli(size: int, order: int) -> np.ndarray:
    """[K] |b(m)|² = 1/|Σ_{k=0}^{p−2} M_p(k+1) e^{2πi m k/K}|² for m = 0..K−1 (NumPy: a constant of the mesh)."""
    knots = _cardinal_bspline(np.arange(1, order, dtype=np.float64), order, np)
    m = np.arange(size)[:, None]
    k = np.arange(order - 1)[None, :]
    denominator = np.abs(np.sum(knots[None, :] * np.exp(2j * np.pi * m * k / size), axis=1)) ** 2
    return 1.0 / denominator


def mesh_reciprocal_potential(sources: jnp.ndarray, positions: jnp.ndarray, inverse_cell: jnp.ndarray,
                              node_graph: jnp.ndarray, mesh_shape: tuple[int, int, int],
                              filter_fn, order: int = SPLINE_ORDER) -> jnp.ndarray:
    """[N] or [N, C]: Σ_x w_i(x) Φ(x) for every atom, its Σ_m θ(m) Re[e^{−ik·r_i} S(m)] over all mesh m.

    Args:
        sources: [N] charges, or [N, C] channels each spread on its own mesh.
        positions: [N, 3] Å.
        inverse_cell: [G, 3, 3] cell⁻¹ of each graph (identity for non-periodic ones).
        node_graph: [N] graph of each atom.
        mesh_shape: (K1, K2, K3), static.
        filter_fn: m [G, K1, K2, K3, 3] (mesh frequencies as floats) -> θ [G, K1, K2, K3]
            (or [..., C]), the weight of each |S(m)|² (0 at m = 0).
        order: B-spline order p.
    """
    n_graph = inverse_cell.shape[0]
    channels = sources.shape[1:]
    sizes = jnp.asarray(mesh_shape, positions.dtype)
    # Mesh coordinates; wrapped into [0, K) so that atoms outside the cell spread correctly.
    scaled = jnp.einsum("nb,nba->na", positions, inverse_cell[node_graph]) * sizes
    scaled = scaled - sizes * jnp.floor(scaled / sizes)
    base = jnp.floor(jax.lax.stop_gradient(scaled))
    offsets = jnp.arange(order, dtype=positions.dtype)
    weights = _cardinal_bspline(scaled[:, :, None] - base[:, :, None] + offsets, order)  # [N, 3, p]
    indices = (base.astype(jnp.int32)[:, :, None] - jnp.arange(order, dtype=jnp.int32)) % jnp.asarray(
        mesh_shape, jnp.int32)[None, :, None]  # [N, 3, p]
    k1, k2, k3 = mesh_shape
    flat_index = (((node_graph[:, None, None, None] * k1 + indices[:, 0, :, None, None]) * k2
                   + indices[:, 1, None, :, None]) * k3 + indices[:, 2, None, None, :])  # [N, p, p, p]
    spline = weights[:, 0, :, None, None] * weights[:, 1, None, :, None] * weights[:, 2, None, None, :]
    spread = sources.reshape((-1, 1, 1, 1) + channels) * spline.reshape(spline.shape + (1,) * len(channels))
    mesh = jnp.zeros((n_graph * k1 * k2 * k3,) + channels, positions.dtype).at[flat_index.reshape(-1)].add(
        spread.reshape((-1,) + channels)).reshape((n_graph, k1, k2, k3) + channels)
    frequencies = jnp.stack(jnp.meshgrid(*[jnp.fft.fftfreq(k, 1.0 / k).astype(positions.dtype)
                                           for k in mesh_shape], indexing="ij"), axis=-1)  # [K1, K2, K3, 3]
    moduli = np.ones(mesh_shape)
    for axis, size in enumerate(mesh_shape):
        shape = [1, 1, 1]
        shape[axis] = size
        moduli = moduli * _spline_moduli(size, order).reshape(shape)
    theta = filter_fn(jnp.broadcast_to(frequencies, (n_graph,) + frequencies.shape))
    theta = theta * jnp.asarray(moduli, positions.dtype).reshape(mesh_shape + (1,) * (theta.ndim - 4))
    transformed = jnp.fft.fftn(mesh, axes=(1, 2, 3))
    potential_mesh = jnp.real(jnp.fft.ifftn(theta * transformed, axes=(1, 2, 3))) * (k1 * k2 * k3)
    gathered = potential_mesh.reshape((-1,) + channels)[flat_index]  # [N, p, p, p(, C)]
    return jnp.sum(gathered * spline.reshape(spline.shape + (1,) * len(channels)), axis=(1, 2, 3))

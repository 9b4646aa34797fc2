"""Magnetic-moment head (CHGNet, METHODS.md §7): per-atom |m_i| from the backbone's invariant features.

    m_i = |Linear(h_i)|   (μ_B, ≥ 0 by construction)

Trained against site magnetic moments as an auxiliary target: regressing them makes the
features encode the valence state (Mn³⁺ against Mn⁴⁺), which is what makes CHGNet
"charge-informed". It is an output beside the energy, never part of it, so forces stay
−∂E/∂r. (CHGNet reads the moments after its third of four convolutions; here the head
reads the backbone's output, the concatenated scalars of every layer.)
"""

from __future__ import annotations

import e3nn_jax as e3nn
import flax.linen as nn
import jax.numpy as jnp


class MagneticMomentHead(nn.Module):
    """[N] non-negative magnetic moments, μ_B."""

    @nn.compact
    def __call__(self, node_features: e3nn.IrrepsArray) -> jnp.ndarray:
        scalars = node_features.filter(keep="0e")
        return jnp.abs(e3nn.flax.Linear("0e", name="linear")(scalars).array[:, 0])

"""Energy readout: invariant node features -> one (normalised) energy per atom.

energy_i = Linear(h_i) + MLP(h_i), the MLP with one SiLU hidden layer of 16 units, as
in MACE's readouts (a linear readout on early layers and a small MLP on the last);
here both see the concatenated scalars of all layers.
"""

from __future__ import annotations

import e3nn_jax as e3nn
import flax.linen as nn
import jax

from mlip.registry import register_head


@register_head("energy")
class EnergyHead(nn.Module):
    """Per-node normalised energy ε_i (the potential applies scale and shift)."""

    mlp_hidden: int = 16

    @nn.compact
    def __call__(self, node_features: e3nn.IrrepsArray):
        scalars = node_features.filter(keep="0e")
        linear = e3nn.flax.Linear("0e", name="linear")(scalars).array[:, 0]
        mlp = e3nn.flax.MultiLayerPerceptron((self.mlp_hidden, 1), act=jax.nn.silu,
                                             output_activation=False, name="mlp")(scalars).array[:, 0]
        return linear + mlp  # [N]

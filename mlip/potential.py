"""`Potential`: backbone + head + normalisation -> energy, and the one place derivatives are taken.

    E_g = Σ_{i in g} [ s · ε_i + μ ]          (ε_i from backbone and head)
    F_i = −∂E/∂r_i,     σ_g = (1/V_g) ∂E_g/∂ε |_{ε=0}   (ASE convention, eV/Å³)

Energies here are *above the per-element reference energies* E0(Z): the references
are large (thousands of eV for DFT) and are added on the host in float64 (see
`Potential.reference_energy`), so float32 on device never carries them. Scale s,
shift μ and E0 are constants of the model, not parameters, so optimisers and
posterior samplers never touch them. Everything downstream (loss, calculator, MD,
uncertainty) calls `Potential.apply(params, graph)`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import mlip.heads  # noqa: F401  (importing registers the heads)
import mlip.models  # noqa: F401  (importing registers the backbones)
from mlip.data.statistics import DatasetStatistics
from mlip.graph import AtomsGraph
from mlip.registry import BACKBONES, HEADS, lookup
from mlip.training.config import ModelConfig


class EnergyModel(nn.Module):
    """Backbone then head: per-node normalised energies ε_i [N]."""

    backbone: nn.Module
    head: nn.Module

    def __call__(self, graph: AtomsGraph, positions: jnp.ndarray, cell: jnp.ndarray) -> jnp.ndarray:
        return self.head(self.backbone(graph, positions, cell))


def build_module(config: ModelConfig, statistics: DatasetStatistics) -> EnergyModel:
    backbone_config = config.backbone.model_dump()
    backbone_cls = lookup(BACKBONES, backbone_config.pop("name"), "model.backbone.name")
    backbone_config["radial_mlp"] = tuple(backbone_config.get("radial_mlp", ()))
    backbone = backbone_cls(atomic_numbers=tuple(statistics.atomic_numbers),
                            avg_num_neighbors=statistics.avg_num_neighbors, **backbone_config)
    head_config = config.head.model_dump()
    head = lookup(HEADS, head_config.pop("name"), "model.head.name")(**head_config)
    return EnergyModel(backbone=backbone, head=head)


@dataclasses.dataclass(frozen=True, eq=False)
class Potential:
    """A model with its normalisation; pure functions of (params, graph)."""

    config: ModelConfig
    statistics: DatasetStatistics

    @functools.cached_property
    def module(self) -> EnergyModel:
        return build_module(self.config, self.statistics)

    @property
    def dtype(self):
        return jnp.float64 if self.config.dtype == "float64" else jnp.float32

    @property
    def cutoff(self) -> float:
        return float(self.config.backbone.r_max)

    def init(self, key: jax.Array, graph: AtomsGraph) -> Any:
        """Trainable parameters for a model that will see graphs like ``graph``."""
        def initialise(key, graph):
            graph = _cast_graph(graph, self.dtype)
            return self.module.init(key, graph, graph.positions, graph.cell)["params"]
        return jax.jit(initialise)(key, graph)  # compiled: e3nn-jax runs slowly op by op

    def reference_energy(self, numbers: np.ndarray) -> float:
        """Σ_i E0(Z_i) in float64 for one structure, eV (host side)."""
        return float(np.sum(self.statistics.e0_per_species()[np.asarray(numbers)]))

    def node_energies(self, params: Any, graph: AtomsGraph, positions: jnp.ndarray,
                      cell: jnp.ndarray) -> jnp.ndarray:
        """[N] per-atom energies above the reference, eV; zero on padding nodes."""
        normalised = self.module.apply({"params": params}, graph, positions, cell)
        energies = self.statistics.scale * normalised + self.statistics.shift
        return jnp.where(graph.node_mask, energies, 0.0)

    def apply(self, params: Any, graph: AtomsGraph, compute_forces: bool = True,
              compute_stress: bool = False) -> dict:
        """Energies, forces and stress of every graph in the batch.

        Returns:
            dict with ``energy`` [G] (eV above the references), ``node_energy`` [N],
            and if requested ``forces`` [N, 3] (eV/Å) and ``stress`` [G, 3, 3] (eV/Å³,
            zero for non-periodic graphs).
        """
        graph = _cast_graph(graph, self.dtype)
        n_graph = graph.n_node.shape[0]

        def energy_of(positions, strain):
            # Apply a symmetric strain to positions and cells: r' = r (I + ε).
            strain = 0.5 * (strain + jnp.swapaxes(strain, -1, -2))
            strained_positions = positions + jnp.einsum("na,nab->nb", positions, strain[graph.node_graph])
            strained_cell = graph.cell + jnp.einsum("gab,gbc->gac", graph.cell, strain)
            node_energy = self.node_energies(params, graph, strained_positions, strained_cell)
            graph_energy = jax.ops.segment_sum(node_energy, graph.node_graph, n_graph)
            return graph_energy.sum(), (graph_energy, node_energy)

        strain = jnp.zeros((n_graph, 3, 3), graph.positions.dtype)
        if not (compute_forces or compute_stress):
            _, (energy, node_energy) = energy_of(graph.positions, strain)
            return {"energy": energy, "node_energy": node_energy}
        argnums = (0, 1) if compute_stress else (0,)
        gradients, (energy, node_energy) = jax.grad(energy_of, argnums=argnums, has_aux=True)(
            graph.positions, strain)
        outputs = {"energy": energy, "node_energy": node_energy,
                   "forces": -gradients[0]}
        if compute_stress:
            volume = jnp.abs(jnp.linalg.det(graph.cell))
            periodic = volume > 1e-12  # non-periodic and padding graphs have a zero cell
            safe_volume = jnp.where(periodic, volume, 1.0)
            outputs["stress"] = jnp.where(periodic[:, None, None],
                                          gradients[1] / safe_volume[:, None, None], 0.0)
        return outputs


def _cast_graph(graph: AtomsGraph, dtype) -> AtomsGraph:
    """Floating fields in the model dtype (integer fields untouched)."""
    def cast(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(cast, graph)

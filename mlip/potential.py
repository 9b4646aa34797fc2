"""`Potential`: backbone + head + normalisation -> energy, and the one place derivatives are taken.

    E_g = Σ_{i in g} [ s · ε_i + μ + e_i^LR + e_i^rep ]   (ε_i from backbone and head; e^LR from a
                                                long-range term such as LES, e^rep from the ZBL
                                                repulsion, both in eV)
    F_i = −∂E/∂r_i,     σ_g = (1/V_g) ∂E_g/∂ε |_{ε=0}   (ASE convention, eV/Å³)

A multi-fidelity model (``config.fidelities``) has one head per level of theory and E0, s, μ
per level; each graph is predicted at ``graph.fidelity`` (or at the potential's fixed
``fidelity``, see `Potential.with_fidelity`).

Heads that predict uncertainty add outputs without changing the energy path: a
mean-variance head adds ``energy_variance`` [G] = Σ_i s² v_i + floor and ``forces_variance``
[N, 3] (per atom, the same for the three components), read as aleatoric variances by
`mlip.uq.PosteriorPotential`; they are auxiliary outputs, never differentiated, so forces
stay −∂E/∂r. A shallow-ensemble head gives K energies per atom: ``energy`` and
``forces`` are the mean over members and ``<name>_members`` [K, ...] hold each member's
energy, forces and stress (K backward passes from one forward pass, batched by
`jax.vmap` of one `jax.vjp`); without member derivatives (training) the forces are
−∂ mean E/∂r from one backward pass.

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
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import mlip.heads  # noqa: F401  (importing registers the heads)
import mlip.models  # noqa: F401  (importing registers the backbones)
import mlip.physics  # noqa: F401  (importing registers the long-range terms)
from mlip.data.statistics import DatasetStatistics
from mlip.errors import ConfigError, MLIPError
from mlip.graph import AtomsGraph
from mlip.heads.fidelity import FidelityHeads
from mlip.heads.magmoms import MagneticMomentHead
from mlip.model_config import ModelConfig
from mlip.models.all_to_all import AllToAllAttention
from mlip.models.transip import EmbeddingMap
from mlip.physics.repulsion import ZBLRepulsion
from mlip.registry import BACKBONES, HEADS, LONG_RANGE, lookup


class EnergyModel(nn.Module):
    """Backbone (then all-to-all attention) then head (and a long-range term): a dict of per-node outputs.

    The head gives ``energy`` [N] (normalised ε) or ``energy_members`` [K, N], and
    optionally ``energy_variance`` [N] and ``forces_variance`` [N]; a long-range term
    adds ``long_range_energy`` [N] (eV, not normalised) and ``charges`` [N] (e); a
    magnetic-moment head ``magmoms`` [N] (μ_B).
    """

    backbone: nn.Module
    head: nn.Module
    long_range: Optional[nn.Module] = None
    magmoms: Optional[nn.Module] = None
    all_to_all: Optional[nn.Module] = None
    embedding_map: Optional[nn.Module] = None  # TransIP's learned rotation action on embeddings
    repulsion: Optional[nn.Module] = None

    def __call__(self, graph: AtomsGraph, positions: jnp.ndarray, cell: jnp.ndarray) -> dict:
        features = self.backbone(graph, positions, cell)
        if self.embedding_map is not None and self.is_initializing():
            self.embedding_map(features.array, jnp.zeros((features.shape[0], 3, 3), features.dtype))
        if self.all_to_all is not None:
            features = self.all_to_all(features, graph, positions, cell)
        if isinstance(self.head, FidelityHeads):
            outputs = self.head(features, graph.fidelity[graph.node_graph])
        else:
            outputs = self.head(features)
        if not isinstance(outputs, dict):
            outputs = {"energy": outputs}
        if self.long_range is not None:
            long_range = self.long_range(features, graph, positions, cell)
            outputs = {**outputs, "long_range_energy": long_range["energy"], "charges": long_range["charges"]}
        if self.magmoms is not None:
            outputs = {**outputs, "magmoms": self.magmoms(features)}
        if self.repulsion is not None:
            outputs = {**outputs, "repulsion_energy": self.repulsion(graph, positions, cell)}
        return outputs

    def invariant_features(self, graph: AtomsGraph) -> jnp.ndarray:
        """[N, F] the invariant node features the heads read (after any all-to-all block)."""
        features = self.backbone(graph, graph.positions, graph.cell)
        if self.all_to_all is not None:
            features = self.all_to_all(features, graph, graph.positions, graph.cell)
        return features.filter(keep="0e").array if hasattr(features, "filter") else features

    def equivariance_residual(self, graph: AtomsGraph, rotations: jnp.ndarray) -> jnp.ndarray:
        """[N] mean over channels of (T(z(x), g) − z(g·x))², zero on padding; rotations [G, 3, 3]."""
        per_node = rotations[graph.node_graph]
        turned = jnp.einsum("nab,nb->na", per_node, graph.positions)
        turned_cell = jnp.einsum("gab,gcb->gca", rotations, graph.cell)
        embedding = self.backbone(graph, graph.positions, graph.cell).array
        target = self.backbone(graph, turned, turned_cell).array
        residual = jnp.mean((self.embedding_map(embedding, per_node) - target) ** 2, axis=-1)
        return jnp.where(graph.node_mask, residual, 0.0)


def build_module(config: ModelConfig, statistics: DatasetStatistics) -> EnergyModel:
    backbone_config = config.backbone.model_dump()
    backbone_cls = lookup(BACKBONES, backbone_config.pop("name"), "model.backbone.name")
    if "radial_mlp" in backbone_config:
        backbone_config["radial_mlp"] = tuple(backbone_config["radial_mlp"])
    if config.fidelity_embedding:
        backbone_config["num_fidelities"] = len(config.fidelity_names)
    backbone = backbone_cls(atomic_numbers=tuple(statistics.atomic_numbers),
                            avg_num_neighbors=statistics.avg_num_neighbors, **backbone_config)
    head_config = config.head.model_dump()
    head_cls = lookup(HEADS, head_config.pop("name"), "model.head.name")
    if config.fidelities:
        head = FidelityHeads(head_cls, tuple(sorted(head_config.items())), config.fidelity_names)
    else:
        head = head_cls(**head_config)
    long_range = None
    if config.long_range is not None:
        long_range_config = config.long_range.model_dump()
        long_range_cls = lookup(LONG_RANGE, long_range_config.pop("name"), "model.long_range.name")
        long_range_config["charge_mlp"] = tuple(long_range_config.get("charge_mlp", ()))
        long_range = long_range_cls(**long_range_config)
    magmoms = MagneticMomentHead() if config.magmoms else None
    all_to_all = None
    if config.all_to_all is not None:
        all_to_all = AllToAllAttention(**config.all_to_all.model_dump(), cutoff=float(config.backbone.r_max))
    embedding_map = EmbeddingMap() if getattr(config.backbone, "equivariance_objective", 0.0) > 0 else None
    repulsion = None
    if config.repulsion is not None:
        repulsion = ZBLRepulsion(r_max=float(config.backbone.r_max), envelope_p=config.repulsion.envelope_p)
    return EnergyModel(backbone=backbone, head=head, long_range=long_range, magmoms=magmoms,
                       all_to_all=all_to_all, embedding_map=embedding_map, repulsion=repulsion)


@dataclasses.dataclass(frozen=True, eq=False)
class Potential:
    """A model with its normalisation; pure functions of (params, graph).

    A multi-fidelity model reads each graph's level of theory from ``graph.fidelity``
    (training, evaluation of tagged data); with ``fidelity`` set (an index into
    ``config.fidelities``; `with_fidelity`) every graph is predicted at that level instead,
    as the calculator and MD do.

    A potential is a JAX pytree: its statistics' numbers are the leaves, the model section
    and the fidelity the structure. Compiled functions take it as an argument,
    ``jax.jit(lambda potential, params, graph: potential.apply(params, graph))``, rather
    than closing over it, so that the scale, shift, E0 and neighbour count are inputs of the
    program: a model of the same section fitted to other data runs the same program (no
    compilation in this process, a hit in the persistent cache in the next).
    """

    config: ModelConfig
    statistics: DatasetStatistics
    fidelity: Optional[int] = None

    def fidelity_index(self, name: Optional[str]) -> int:
        """Index of fidelity ``name`` (None: the default, the last listed); a clear error for a bad name."""
        names = self.config.fidelity_names
        if name is None:
            return max(len(names) - 1, 0)
        if not names:
            raise ConfigError(f"fidelity '{name}' asked of a single-fidelity model (it has no model.fidelities)")
        if name not in names:
            raise ConfigError(f"fidelity '{name}' is not one of this model's fidelities {list(names)}")
        return names.index(name)

    def with_fidelity(self, name: Optional[str]) -> "Potential":
        """This model predicting every structure at fidelity ``name`` (None: the default)."""
        index = self.fidelity_index(name)  # a clear error for a bad name, or any name to a single-fidelity model
        return dataclasses.replace(self, fidelity=index if self.config.fidelities else None)

    @functools.cached_property
    def module(self) -> EnergyModel:
        return build_module(self.config, self.statistics)

    @property
    def dtype(self):
        return jnp.float64 if self.config.dtype == "float64" else jnp.float32

    @property
    def cutoff(self) -> float:
        return float(self.config.backbone.r_max)

    @property
    def k_cutoff(self) -> Optional[float]:
        """|k| limit of the reciprocal-space sums (Å⁻¹), None for a model without one.

        Graphs for this potential carry the k indices within it (`build_sample`)."""
        return self.config.k_cutoff

    @property
    def molecules_only(self) -> bool:
        """True for a model that cannot describe periodic structures (graphs are built to refuse them)."""
        return self.config.molecules_only

    def init(self, key: jax.Array, graph: AtomsGraph) -> Any:
        """Trainable parameters for a model that will see graphs like ``graph``."""
        return _initialise(self, key, graph)  # compiled: e3nn-jax runs slowly op by op

    def equivariance_loss(self, params: Any, graph: AtomsGraph, rotations: jnp.ndarray) -> jnp.ndarray:
        """TransIP's embedding-space equivariance objective (unweighted): mean over real atoms of
        the per-atom residual of `EnergyModel.equivariance_residual`."""
        graph = _cast_graph(graph, self.dtype)
        residual = self.module.apply({"params": params}, graph, rotations.astype(self.dtype),
                                     method=EnergyModel.equivariance_residual)
        return residual.sum() / jnp.maximum(graph.node_mask.sum(), 1)

    def structure_features(self, params: Any, graph: AtomsGraph) -> jnp.ndarray:
        """[G, F] the mean of each structure's invariant node features: a descriptor of the structure
        in the model's own terms (diversity in active-learning selection)."""
        graph = _cast_graph(graph, self.dtype)
        if self.fidelity is not None:
            graph = dataclasses.replace(graph, fidelity=jnp.full_like(graph.fidelity, self.fidelity))
        features = self.module.apply({"params": params}, graph, method=EnergyModel.invariant_features)
        features = jnp.where(graph.node_mask[:, None], features, 0.0)
        totals = jax.ops.segment_sum(features, graph.node_graph, graph.n_node.shape[0])
        return totals / jnp.maximum(graph.n_node, 1)[:, None].astype(features.dtype)

    def reference_energy(self, numbers: np.ndarray, fidelity: Optional[int] = None) -> float:
        """Σ_i E0(Z_i) in float64 for one structure, eV (host side), at the fixed fidelity of this
        potential, else at index ``fidelity`` (the structure's tag), else at the default."""
        return float(np.sum(self.reference_energies(numbers, fidelity)))

    def reference_energies(self, numbers: np.ndarray, fidelity: Optional[int] = None) -> np.ndarray:
        """[n] E0(Z_i) of each atom, float64, eV (fidelity as `reference_energy`)."""
        fidelity = self.fidelity if self.fidelity is not None else fidelity
        return self.statistics.e0_per_species(fidelity)[np.asarray(numbers)]

    @property
    def ensemble_members(self) -> int:
        """K readout members of a shallow-ensemble head; 0 for a single-energy head."""
        return int(getattr(self.config.head, "members", 0)) if self.config.head.name == "shallow_ensemble" else 0

    def node_outputs(self, params: Any, graph: AtomsGraph, positions: jnp.ndarray,
                     cell: jnp.ndarray) -> dict:
        """Per-atom outputs in eV units, zero on padding nodes.

        ``node_energy`` [N] (or [K, N] for a shallow ensemble) above the reference, and
        for a mean-variance head ``energy_variance`` [N] (eV²) and ``forces_variance`` [N]
        ((eV/Å)²), each scale² times the head's normalised variance plus the floor.
        """
        if self.fidelity is not None:
            graph = dataclasses.replace(graph, fidelity=jnp.full_like(graph.fidelity, self.fidelity))
        head_outputs = self.module.apply({"params": params}, graph, positions, cell)
        scale, shift = self.statistics.scale, self.statistics.shift
        if self.statistics.fidelities:  # E0, shift and scale of each atom's level of theory
            node_fidelity = graph.fidelity[graph.node_graph]
            # jnp, not the statistics' numpy tables: under `jax.jit` these numbers are traced inputs.
            scale = jnp.stack([f.scale for f in self.statistics.fidelities]).astype(positions.dtype)[node_fidelity]
            shift = jnp.stack([f.shift for f in self.statistics.fidelities]).astype(positions.dtype)[node_fidelity]
        normalised = head_outputs["energy_members"] if "energy_members" in head_outputs else head_outputs["energy"]
        node_energy = jnp.where(graph.node_mask, scale * normalised + shift, 0.0)
        for name in ("long_range_energy", "repulsion_energy"):
            if name in head_outputs:
                # In eV already: the Coulomb energy of the charges and the nuclear repulsion are
                # not rescaled (and are shared by all readout members).
                node_energy = node_energy + head_outputs[name]
        outputs = {"node_energy": node_energy}
        for name in ("charges", "magmoms"):  # per-atom outputs beside the energy, never differentiated
            if name in head_outputs:
                outputs[name] = jnp.where(graph.node_mask, head_outputs[name], 0.0)
        floor = getattr(self.config.head, "variance_floor", 0.0)
        for name in ("energy_variance", "forces_variance"):
            if name in head_outputs:
                outputs[name] = jnp.where(graph.node_mask, scale**2 * head_outputs[name] + floor, 0.0)
        return outputs

    def node_energies(self, params: Any, graph: AtomsGraph, positions: jnp.ndarray,
                      cell: jnp.ndarray) -> jnp.ndarray:
        """[N] per-atom energies above the reference, eV (member mean for an ensemble head); 0 on padding."""
        node_energy = self.node_outputs(params, graph, positions, cell)["node_energy"]
        return node_energy.mean(axis=0) if node_energy.ndim == 2 else node_energy

    def apply(self, params: Any, graph: AtomsGraph, compute_forces: bool = True,
              compute_stress: bool = False, member_derivatives: bool = True) -> dict:
        """Energies, forces and stress of every graph in the batch.

        Args:
            member_derivatives: for a shallow-ensemble head, also each member's forces
                and stress (K backward passes); False gives only the mean's (one pass),
                e.g. for training on the mean forces.

        Returns:
            dict with ``energy`` [G] (eV above the references), ``node_energy`` [N],
            for a model with a long-range term ``charges`` [N] (e), with a magnetic-moment
            head ``magmoms`` [N] (μ_B), and if requested ``forces`` [N, 3] (eV/Å) and ``stress`` [G, 3, 3] (eV/Å³,
            zero for non-periodic graphs). A mean-variance head adds ``energy_variance``
            [G] (eV²) and ``forces_variance`` [N, 3] ((eV/Å)²); a shallow-ensemble head
            adds ``energy_members`` [K, G] and, with ``member_derivatives``,
            ``forces_members`` [K, N, 3] and ``stress_members`` [K, G, 3, 3].
        """
        graph = _cast_graph(graph, self.dtype)
        n_graph = graph.n_node.shape[0]
        members = self.ensemble_members

        def energy_of(positions, strain):
            # Apply a symmetric strain to positions and cells: r' = r (I + ε).
            strain = 0.5 * (strain + jnp.swapaxes(strain, -1, -2))
            strained_positions = positions + jnp.einsum("na,nab->nb", positions, strain[graph.node_graph])
            strained_cell = graph.cell + jnp.einsum("gab,gbc->gac", graph.cell, strain)
            nodes = self.node_outputs(params, graph, strained_positions, strained_cell)
            # [G] or [K, G]: segment sums over the last (node) axis.
            graph_energy = jax.ops.segment_sum(jnp.moveaxis(nodes["node_energy"], -1, 0), graph.node_graph,
                                               n_graph)
            graph_energy = jnp.moveaxis(graph_energy, 0, -1)
            # Variances ride along as auxiliary outputs: never differentiated.
            total = graph_energy.sum(axis=-1)  # scalar, or [K] per member
            return (total.mean() if members else total), (graph_energy, nodes, total)

        strain = jnp.zeros((n_graph, 3, 3), graph.positions.dtype)
        if not (compute_forces or compute_stress):
            _, aux = energy_of(graph.positions, strain)
            return self._collect(graph, aux[0], aux[1])
        if members and member_derivatives:
            def member_totals(positions, strain):
                _, aux = energy_of(positions, strain)
                return aux[2], aux  # [K] per-member totals

            _, vjp, (energy, nodes, _) = jax.vjp(member_totals, graph.positions, strain, has_aux=True)
            # One forward pass, K backward passes batched: row k of the identity picks member k.
            member_gradients = jax.vmap(vjp)(jnp.eye(members, dtype=graph.positions.dtype))
            outputs = self._collect(graph, energy, nodes)
            # The mean's derivative is the mean of the members' (the energy is linear in them).
            outputs["forces_members"] = -member_gradients[0]
            outputs["forces"] = jnp.mean(outputs["forces_members"], axis=0)
            if compute_stress:
                outputs["stress_members"] = jax.vmap(lambda g: self._stress(graph, g))(member_gradients[1])
                outputs["stress"] = jnp.mean(outputs["stress_members"], axis=0)
            return outputs
        argnums = (0, 1) if compute_stress else (0,)
        gradients, (energy, nodes, _) = jax.grad(energy_of, argnums=argnums, has_aux=True)(
            graph.positions, strain)
        outputs = self._collect(graph, energy, nodes)
        outputs["forces"] = -gradients[0]
        if compute_stress:
            outputs["stress"] = self._stress(graph, gradients[1])
        return outputs

    def _collect(self, graph: AtomsGraph, graph_energy: jnp.ndarray, nodes: dict) -> dict:
        """Energy outputs (and variances) from the forward pass, member means for an ensemble head."""
        node_energy = nodes["node_energy"]
        if self.ensemble_members:
            outputs = {"energy": graph_energy.mean(axis=0), "node_energy": node_energy.mean(axis=0),
                       "energy_members": graph_energy}
        else:
            outputs = {"energy": graph_energy, "node_energy": node_energy}
        for name in ("charges", "magmoms"):
            if name in nodes:
                outputs[name] = nodes[name]
        if "energy_variance" in nodes:
            outputs["energy_variance"] = jax.ops.segment_sum(nodes["energy_variance"], graph.node_graph,
                                                             graph.n_node.shape[0])
        if "forces_variance" in nodes:
            outputs["forces_variance"] = jnp.repeat(nodes["forces_variance"][:, None], 3, axis=1)
        return outputs

    @staticmethod
    def _stress(graph: AtomsGraph, strain_gradient: jnp.ndarray) -> jnp.ndarray:
        volume = jnp.abs(jnp.linalg.det(graph.cell))
        periodic = volume > 1e-12  # non-periodic and padding graphs have a zero cell
        safe_volume = jnp.where(periodic, volume, 1.0)
        return jnp.where(periodic[:, None, None], strain_gradient / safe_volume[:, None, None], 0.0)


class _ModelSection:
    """A model section as pytree structure: equal (and hashed) by its JSON, computed once per potential."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.key = config.model_dump_json()

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, _ModelSection) and self.key == other.key)

    def __hash__(self) -> int:
        return hash(self.key)


def _flatten_potential(potential: Potential):
    section = potential.__dict__.get("_section")
    if section is None:  # once per potential: a model section's JSON is not free to make every call
        section = _ModelSection(potential.config)
        potential.__dict__["_section"] = section
    return (potential.statistics,), (section, potential.fidelity)


def _unflatten_potential(structure, leaves) -> Potential:
    section, fidelity = structure
    potential = Potential(section.config, leaves[0], fidelity)
    potential.__dict__["_section"] = section
    return potential


jax.tree_util.register_pytree_node(Potential, _flatten_potential, _unflatten_potential)


def on_device(potential):
    """``potential`` with its numbers on the device, to pass to compiled programs call after call.

    For compiled programs only: its E0 are in the device's precision (float32 unless x64 is
    on), so reference energies stay the original potential's (host float64).

    Raises:
        MLIPError: a potential of a class JAX cannot take apart (a user's own, not registered
            as a pytree), naming what to do.
    """
    try:
        return jax.device_put(potential)
    except TypeError:
        raise MLIPError(
            f"a {type(potential).__name__} cannot be passed to mlip's compiled programs: potentials are JAX "
            f"pytrees (see mlip.potential.Potential); register the class with jax.tree_util.register_static, "
            f"or with register_pytree_node where it holds numbers a compiled program should take as inputs") from None


@jax.jit
def compiled_structure_features(potential: Potential, params: Any, graph: AtomsGraph) -> jnp.ndarray:
    """`Potential.structure_features`, compiled once for every model of one architecture."""
    return potential.structure_features(params, graph)


@jax.jit
def _initialise(potential: Potential, key: jax.Array, graph: AtomsGraph) -> Any:
    graph = _cast_graph(graph, potential.dtype)
    return potential.module.init(key, graph, graph.positions, graph.cell)["params"]


def _cast_graph(graph: AtomsGraph, dtype) -> AtomsGraph:
    """Floating fields in the model dtype (integer fields untouched)."""
    def cast(x):
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(cast, graph)

"""MD speed: steps/s and µs per atom per step, mlip against mace-torch and apax, in one run.

Systems: ethanol (9 atoms, non-periodic, frame 0 of data/ethanol_gfn2_500K.extxyz) and
periodic fcc Cu with 25 % Au on random sites (a = 3.7 Å) in cubic supercells of 4 k^3
atoms (108, 500, 2048, 4000 by default). Velocities: Maxwell-Boltzmann at 300 K (seed 0),
zero total momentum; NVE, timestep 0.5 fs. Paths timed, each case in its own process:

    mlip-ase   mlip's MLIPCalculator (skin 0.5 Å) driven by ASE VelocityVerlet
    mlip-md    mlip's on-device MD (mlip.md.MolecularDynamics, NVE, skin 0.5 Å)
    mlip-ase-small, mlip-md-small   the same two with the small model of configs/small.yaml
    mace-ase   mace-torch's MACECalculator driven by ASE VelocityVerlet
    mace-ase-small   the same with the architecture of mlip's small model
    apax-ase   apax's ASECalculator driven by ASE VelocityVerlet
    apax-md    apax's own JAX MD (apax.md.simulate.run_sim, NVE)

Models: mlip's default model (MACE, 64x0e+64x1o, l <= 3 harmonics, correlation 3,
2 interactions, r_max 5 Å, radial MLP 64-64-64) and mace-torch's MACE with the same
hyperparameters; for the *-small paths, the backbone of configs/small.yaml (one
interaction, 16 scalar channels, l <= 2, correlation 3); apax's GMNN (its defaults,
with the 16-function Bessel basis at r_max 5 Å as in scripts/benchmark_accuracy.py).
One model per family: H/C/O for ethanol, Cu/Au for the metal. Metal: mlip's default
model and mace-torch have random weights (energies scaled by 0.1 eV, so forces stay
small and the timed steps are nearly free flight at 300 K; mace's ScaleShiftMACE is
built directly, saved with torch.save and loaded by MACECalculator from the file).
mlip's small model is trained for ``--train-seconds`` on 200 frames of
data/cuau_emt.extxyz: at its speed enough steps are timed for random weights to bring
atoms together; mace-torch's small model for ``--mace-small-epochs`` (mace_run_train)
on the same frames, for both families. Ethanol: a random model lets the molecule fly
apart, so both mlip models (``--train-seconds``) and mace-torch (``--mace-epochs``,
mace_run_train) are trained briefly on 200 frames. apax can only load a trained model directory: its GMNN
is trained for ``--apax-epochs`` epochs on 200 frames per family. All training is
untimed and cached in ``--work-dir``. Timing depends on atom and neighbour counts, not
on the weights; the JSON records each case's temperature at start and end as a check.

Each case runs some warm-up steps first (compilation; reported as ``warmup_s``, not
timed), then steps in chunks until ``--min-seconds`` of stepping or ``--max-steps`` steps.
When one step of a path takes longer than ``--step-limit-s`` (measured, or predicted
linearly from the last size), its larger sizes are skipped and recorded with the reason.
Results: docs/benchmark_md.json, a table between ``<!-- md-speed:start -->`` and
``<!-- md-speed:end -->`` in docs/benchmarks.md, and docs/benchmark_md.png.

    python scripts/benchmark_md.py --setup          # creates /work/peers/{mace,apax}-venv
    python scripts/benchmark_md.py                  # full run (about an hour on 2 cores)
    python scripts/benchmark_md.py --sizes 9 108 --max-steps 5 --no-docs   # smoke test

This is a benchmark script, never part of the test suite. Only the standard library is
imported at module level: the same file runs as the worker inside each peer's venv.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time

# scripts/ is sys.path[0]
from benchmark_common import cpu_model, replace_marked_section, setup, small_backbone, versions  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETHANOL = os.path.join(ROOT, "data", "ethanol_gfn2_500K.extxyz")
CUAU = os.path.join(ROOT, "data", "cuau_emt.extxyz")
PATHS = ("mlip-ase", "mlip-md", "mlip-ase-small", "mlip-md-small", "mace-ase", "mace-ase-small", "apax-ase",
         "apax-md")
FRAMEWORK_OF = {"mlip-ase": "mlip", "mlip-md": "mlip", "mlip-ase-small": "mlip", "mlip-md-small": "mlip",
                "mace-ase": "mace", "mace-ase-small": "mace", "apax-ase": "apax", "apax-md": "apax"}
DESCRIPTIONS = {
    "mlip-ase": "mlip MLIPCalculator (skin {mlip_skin:g} Å) + ASE VelocityVerlet",
    "mlip-md": "mlip on-device MD (mlip.md, NVE, skin {mlip_skin:g} Å)",
    "mlip-ase-small": "mlip small model, MLIPCalculator (skin {mlip_skin:g} Å) + ASE VelocityVerlet",
    "mlip-md-small": "mlip small model, on-device MD (mlip.md, NVE, skin {mlip_skin:g} Å)",
    "mace-ase": "mace-torch MACECalculator + ASE VelocityVerlet",
    "mace-ase-small": "mace-torch, mlip's small model's architecture, MACECalculator + ASE VelocityVerlet",
    "apax-ase": "apax ASECalculator (skin {apax_skin:g} Å) + ASE VelocityVerlet",
    "apax-md": "apax JAX MD (run_sim, NVE, skin {apax_skin:g} Å)",
}


def describe(path: str, meta: dict) -> str:
    return DESCRIPTIONS[path].format(**meta)
# One architecture for both MACE implementations: mlip's defaults (MACEConfig).
MACE_ARCHITECTURE = {"r_max": 5.0, "num_channels": 64, "max_L": 1, "max_ell": 3, "correlation": 3,
                     "num_interactions": 2, "num_bessel": 8, "num_polynomial_cutoff": 5,
                     "radial_mlp": [64, 64, 64], "readout_hidden": 16}


def mace_small_architecture() -> dict:
    """mace-torch's hyperparameters for the architecture of mlip's small model (configs/small.yaml)."""
    backbone = small_backbone()
    return {**MACE_ARCHITECTURE, "r_max": backbone["r_max"], "num_channels": backbone["num_channels"],
            "max_L": backbone["max_l"], "max_ell": backbone["max_ell"], "correlation": backbone["correlation"],
            "num_interactions": backbone["num_interactions"], "radial_mlp": list(backbone["radial_mlp"]),
            "num_bessel": backbone.get("num_bessel", 8),
            "num_polynomial_cutoff": backbone.get("envelope_p", 5)}


APAX_MODEL = {"name": "gmnn", "basis": {"name": "bessel", "n_basis": 16, "r_max": 5.0}}
FAMILIES = {"molecule": (1, 6, 8), "metal": (29, 79)}
FCC_A = 3.7  # Å, between Cu (3.61) and Cu3Au (3.75)
AU_FRACTION = 0.25
# Random weights: normalised energies are multiplied by this (eV), keeping forces modest.
ENERGY_SCALE = 0.1
APAX_N_INNER = 500  # apax's default steps per compiled block


# ================================================================ systems (parent, mlip venv)
def family_of(n_atoms: int) -> str:
    return "molecule" if n_atoms == 9 else "metal"


def build_system(n_atoms: int, temperature_K: float, seed: int):
    """ethanol for 9 atoms, else a cubic fcc Cu/Au supercell of exactly ``n_atoms`` atoms."""
    import ase.io
    import numpy as np
    from ase.build import bulk
    from ase.md.velocitydistribution import Stationary, ZeroRotation
    try:
        from ase.md.velocitydistribution import thermalize_momenta  # ase >= 3.29
    except ImportError:
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

    rng = np.random.default_rng(seed)
    if n_atoms == 9:
        atoms = ase.io.read(ETHANOL, 0)
        atoms.info.clear()
        for key in list(atoms.arrays):
            if key not in ("numbers", "positions"):
                del atoms.arrays[key]
        atoms.calc = None
        atoms.cell = np.zeros((3, 3))
        atoms.pbc = False
    else:
        k = round((n_atoms / 4) ** (1 / 3))
        if 4 * k**3 != n_atoms:
            raise SystemExit(f"error: --sizes: {n_atoms} is neither 9 (ethanol) nor 4 k^3 (fcc supercell); "
                             f"nearest are {4 * k**3} and {4 * (k + 1)**3}")
        atoms = bulk("Cu", "fcc", a=FCC_A, cubic=True).repeat((k, k, k))
        gold = rng.choice(n_atoms, int(round(AU_FRACTION * n_atoms)), replace=False)
        atoms.numbers[gold] = 79
    thermalize_momenta(atoms, temperature_K=temperature_K, rng=rng)
    Stationary(atoms)
    if not atoms.pbc.any():
        ZeroRotation(atoms)
    return atoms


def average_neighbours(atoms, cutoff: float) -> float:
    from ase.neighborlist import neighbor_list

    return float(len(neighbor_list("i", atoms, cutoff)) / len(atoms))


# ================================================================ workers (each path's venv)
class Stopwatch:
    """Times ``advance(n)`` in chunks until ``min_seconds`` have passed or ``max_steps`` are done."""

    def __init__(self, min_seconds: float, max_steps: int, step_limit_s: float, multiple: int = 1):
        self.min_seconds, self.max_steps = min_seconds, max_steps
        self.step_limit_s, self.multiple = step_limit_s, multiple

    def run(self, advance, compilations=None) -> dict:
        """``compilations() -> int``, where given: a chunk during which it grew (a program compiled,
        or loaded from the cache, in the middle of the run) is left out of the timing."""
        done, elapsed, chunk, left_out = 0, 0.0, self.multiple, 0
        while done < self.max_steps and elapsed < self.min_seconds:
            compiled_before = compilations() if compilations else 0
            start = time.perf_counter()
            advance(chunk)
            seconds = time.perf_counter() - start
            if compilations and compilations() != compiled_before:
                left_out += chunk
                continue
            elapsed += seconds
            done += chunk
            per_step = elapsed / done
            if per_step > self.step_limit_s:
                break  # measured; larger sizes will be skipped by the parent
            wanted = int(math.ceil((self.min_seconds - elapsed) / per_step))
            chunk = max(self.multiple, min(wanted, self.max_steps - done, 4 * done + 10))
            chunk = int(math.ceil(chunk / self.multiple)) * self.multiple
        return {"steps": done, "seconds": elapsed, "steps_left_out_compiling": left_out}


def _temperature(atoms) -> float:
    return float(atoms.get_temperature())


def _ase_case(spec: dict, make_calculator) -> dict:
    import ase.io
    from ase import units
    from ase.md.verlet import VelocityVerlet

    atoms = ase.io.read(spec["structure"])
    start = time.perf_counter()
    calculator = make_calculator(atoms)
    setup_s = time.perf_counter() - start
    atoms.calc = calculator
    t_start = _temperature(atoms)
    dynamics = VelocityVerlet(atoms, timestep=spec["timestep_fs"] * units.fs)
    start = time.perf_counter()
    atoms.get_forces()  # first call: compilation (jax) or first evaluation
    first_call_s = time.perf_counter() - start
    # Warm-up: --warmup-steps steps, or at least 2 once they take over min_seconds / 2.
    warmup_steps = 0
    while warmup_steps < spec["warmup_steps"]:
        dynamics.run(1)
        warmup_steps += 1
        if warmup_steps >= 2 and time.perf_counter() - start - first_call_s > spec["min_seconds"] / 2:
            break
    warmup_s = time.perf_counter() - start
    timing = Stopwatch(spec["min_seconds"], spec["max_steps"], spec["step_limit_s"]).run(dynamics.run)
    return {**timing, "setup_s": setup_s, "first_call_s": first_call_s, "warmup_s": warmup_s,
            "warmup_steps": warmup_steps,
            "temperature_start_K": t_start, "temperature_end_K": _temperature(atoms),
            "max_force_end": float(abs(atoms.get_forces()).max())}


def _mlip_potential(spec: dict):
    import jax

    if spec.get("mlip_model"):  # briefly trained (ethanol)
        from mlip.training.checkpoint import load_potential
        potential, params = load_potential(spec["mlip_model"])
        return potential, params, int(sum(x.size for x in jax.tree.leaves(params)))

    from mlip.data.statistics import DatasetStatistics
    from mlip.potential import Potential
    from mlip.training.checkpoint import dummy_graph
    from mlip.training.config import ModelConfig

    numbers = FAMILIES[spec["family"]]
    statistics = DatasetStatistics(atomic_numbers=numbers, e0={z: 0.0 for z in numbers}, shift=0.0,
                                   scale=ENERGY_SCALE, avg_num_neighbors=spec["avg_num_neighbors"])
    potential = Potential(ModelConfig(), statistics)  # the default model, float32
    params = potential.init(jax.random.PRNGKey(spec["seed"]), dummy_graph(numbers))
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    return potential, params, n_params


def device_memory(jax) -> dict:
    """The device's peak memory in use so far, GB (a GPU reports it; a CPU does not)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
        return {}
    return {"device_peak_GB": round(stats["peak_bytes_in_use"] / 1e9, 2),
            "device_limit_GB": round(stats.get("bytes_limit", 0) / 1e9, 2)}


def worker_mlip_ase(spec: dict) -> dict:
    import jax

    from mlip import host_memory
    from mlip.calculator import MLIPCalculator

    info = {}

    def make(atoms):
        potential, params, info["n_params"] = _mlip_potential(spec)
        info["calculator"] = MLIPCalculator(potential, params, skin=spec["skin"])
        return info["calculator"]

    result = _ase_case(spec, make)
    result.update(n_params=info["n_params"], neighbour_list_builds=info["calculator"].neighbour_list_builds,
                  device=str(jax.devices()[0]), host_memory_kept=host_memory.applied, **device_memory(jax))
    return result


def worker_mlip_md(spec: dict) -> dict:
    import ase.io
    import jax

    from mlip import host_memory
    from mlip.md import MolecularDynamics

    atoms = ase.io.read(spec["structure"])
    t_start = _temperature(atoms)
    start = time.perf_counter()
    potential, params, n_params = _mlip_potential(spec)
    block = min(spec["block_steps"], spec["max_steps"])
    overlap = {"auto": None, "on": True, "off": False}[spec.get("overlap", "auto")]
    md = MolecularDynamics(potential, params, atoms, ensemble="nve", timestep_fs=spec["timestep_fs"],
                           temperature_K=None, skin=spec["skin"], block_steps=block,
                           overlap_neighbour_lists=overlap)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    md.run(block)  # one block: compilation and the first steps
    warmup_s = time.perf_counter() - start
    timing = Stopwatch(spec["min_seconds"], spec["max_steps"], spec["step_limit_s"], block).run(
        md.run, compilations=lambda: md.compilations)
    final = md.atoms
    result = {**timing, "setup_s": setup_s, "warmup_s": warmup_s, "block_steps": block,
              "temperature_start_K": t_start, "temperature_end_K": _temperature(final),
              "steps_done": int(md.steps_done), "n_params": n_params, "device": str(jax.devices()[0]),
              "host_memory_kept": host_memory.applied}
    for name in ("neighbour_list_builds", "compilations"):
        if hasattr(md, name):
            result[name] = int(getattr(md, name))
    if hasattr(md, "neighbour_wait_s"):  # host time the steps waited for lists, warm-up included
        result.update(neighbour_wait_s=round(md.neighbour_wait_s, 3), overlap=md.overlap_neighbour_lists)
    result.update(device_memory(jax))
    if hasattr(md, "energy_drift"):
        result["energy_drift_eV_per_atom_ps"] = float(md.energy_drift())
    return result


def _build_mace_model(spec: dict, path: str) -> int:
    import numpy as np
    import torch
    from mace import modules  # first: it allows torch.load of e3nn's constants (weights_only)
    from e3nn import o3

    torch.manual_seed(spec["seed"])
    numbers = list(FAMILIES[spec["family"]])
    a = MACE_ARCHITECTURE
    model = modules.ScaleShiftMACE(
        r_max=a["r_max"], num_bessel=a["num_bessel"], num_polynomial_cutoff=a["num_polynomial_cutoff"],
        max_ell=a["max_ell"],
        # mace_run_train's --model=MACE: residual interactions, a plain first interaction.
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
        num_interactions=a["num_interactions"], num_elements=len(numbers),
        hidden_irreps=o3.Irreps(f"{a['num_channels']}x0e+{a['num_channels']}x1o"),
        MLP_irreps=o3.Irreps(f"{a['readout_hidden']}x0e"), atomic_energies=np.zeros(len(numbers)),
        avg_num_neighbors=spec["avg_num_neighbors"], atomic_numbers=numbers,
        correlation=a["correlation"], gate=torch.nn.functional.silu, radial_MLP=a["radial_mlp"],
        atomic_inter_scale=ENERGY_SCALE, atomic_inter_shift=0.0, heads=["Default"])
    torch.save(model, path)
    return int(sum(p.numel() for p in model.parameters()))


def worker_mace_ase(spec: dict) -> dict:
    import torch

    torch.set_default_dtype(torch.float32)
    if spec.get("torch_threads"):
        torch.set_num_threads(spec["torch_threads"])
    device = spec["mace_device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.get("mace_model"):  # briefly trained by mace_run_train (ethanol; the small model: both)
        path = spec["mace_model"]
        n_params = None
    else:
        path = os.path.join(spec["work_dir"], f"mace_{spec['family']}.model")
        n_params = _build_mace_model(spec, path)  # random weights, rebuilt each case (same seed)

    def make(atoms):
        from mace.calculators import MACECalculator
        return MACECalculator(model_paths=path, device=device, default_dtype="float32")

    result = _ase_case(spec, make)
    if n_params is None:
        n_params = int(sum(p.numel() for p in torch.load(path, weights_only=False).parameters()))
    result.update(n_params=n_params, device=device, torch_threads=torch.get_num_threads())
    return result


def worker_apax_ase(spec: dict) -> dict:
    import jax

    def make(atoms):
        from apax.md import ASECalculator
        return ASECalculator(model_dir=spec["apax_model"], dr_threshold=spec["apax_skin"])

    result = _ase_case(spec, make)
    result.update(device=str(jax.devices()[0]), n_params=_apax_parameter_count(spec["apax_model"]))
    return result


def _apax_parameter_count(model_dir: str) -> int:
    import jax
    from apax.train.checkpoints import restore_parameters

    _, params = restore_parameters(model_dir)
    return int(sum(x.size for x in jax.tree.leaves(params)))


def worker_apax_md(spec: dict) -> dict:
    """apax's own MD loop (run_sim) as `apax md` runs it, timed from its per-step host callback."""
    from pathlib import Path

    import ase.io
    import jax
    import jax.numpy as jnp
    import numpy as np
    from apax.config import parse_config
    from apax.md.dynamics_checks import DynamicsCheckBase
    from apax.md.io import H5TrajHandler
    from apax.md.simulate import md_setup, run_sim
    from jax.experimental import io_callback

    sim_dir = Path(spec["work_dir"]) / f"apax_md_{spec['n_atoms']}"
    sim_dir.mkdir(parents=True, exist_ok=True)
    for old in sim_dir.glob("*.h5"):
        old.unlink()
    atoms = ase.io.read(spec["structure"])
    t_start = _temperature(atoms)
    block = min(spec["block_steps"], spec["max_steps"])
    # apax's defaults (sampling_rate 10, buffer 2500, dr_threshold 0.5, n_inner 500);
    # n_inner is lowered by the parent where a block would take too long (apax_block).
    md_config = parse_config({
        "ensemble": {"name": "nve", "dt": spec["timestep_fs"]},
        "duration": spec["timestep_fs"] * block * math.ceil((spec["max_steps"] + 1) / block),
        "n_inner": block, "dr_threshold": spec["apax_skin"], "initial_structure": spec["structure"],
        "load_momenta": True, "sim_dir": str(sim_dir), "restart": False, "disable_pbar": True,
    }, mode="md")
    model_config = parse_config(os.path.join(spec["apax_model"], "config.yaml"))
    start = time.perf_counter()
    system, sim_fns = md_setup(model_config, md_config)
    setup_s = time.perf_counter() - start
    stamps, kinetic = [], []
    min_seconds, max_steps = spec["min_seconds"], spec["max_steps"]

    class TimedTrajectory(H5TrajHandler):
        def step(self, state, transform=None):
            stamps.append(time.perf_counter())
            super().step(state, transform)
            md_state = state[0]
            kinetic.append(0.5 * float(np.sum(np.asarray(md_state.momentum) ** 2
                                              / np.asarray(md_state.mass).reshape(-1, 1))))

    def keep_going(_):
        timed = len(stamps) - 1
        return np.bool_(timed < max_steps and (timed < 1 or stamps[-1] - stamps[0] < min_seconds))

    class TimeLimit(DynamicsCheckBase):
        """Fails (ends apax's loop after the current block) once enough steps are timed."""

        def check(self, predictions, positions, box):
            return io_callback(keep_going, jax.ShapeDtypeStruct((), jnp.bool_), positions[0, 0])

    trajectory = TimedTrajectory(system, md_config.sampling_rate, md_config.buffer_size,
                                 sim_dir / md_config.traj_name, md_config.ensemble.dt,
                                 properties=md_config.properties,
                                 h5md_options=md_config.h5md_options.model_dump())
    n_steps = int(math.ceil(md_config.duration / md_config.ensemble.dt))
    start = time.perf_counter()
    run_sim(system, sim_fns, md_config.ensemble, sim_dir=sim_dir, n_steps=n_steps, n_inner=block,
            extra_capacity=md_config.extra_capacity, rng_key=jax.random.PRNGKey(spec["seed"]),
            traj_handler=trajectory, load_momenta=True, restart=False, dynamics_checks=[TimeLimit()],
            disable_pbar=True)
    total_s = time.perf_counter() - start
    if len(stamps) < 2:
        raise RuntimeError(f"apax's MD made {len(stamps)} steps")
    from ase.units import kB
    n = spec["n_atoms"]
    # The first callback comes after compilation and the first step: time the steps after it.
    return {"steps": len(stamps) - 1, "seconds": stamps[-1] - stamps[0], "setup_s": setup_s,
            "warmup_s": stamps[0] - start, "run_sim_total_s": total_s, "block_steps": block,
            "median_step_s": float(np.median(np.diff(stamps))),
            # host work between apax's compiled blocks (its checks, the next dispatch)
            "mean_block_gap_s": (float(np.mean(np.diff(stamps)[block - 1::block]))
                                 if len(stamps) > block else None),
            "sampling_rate": md_config.sampling_rate, "temperature_start_K": t_start,
            "temperature_end_K": 2 * kinetic[-1] / (3 * n * kB), "device": str(jax.devices()[0]),
            "n_params": _apax_parameter_count(spec["apax_model"])}


WORKERS = {"mlip-ase": worker_mlip_ase, "mlip-md": worker_mlip_md, "mlip-ase-small": worker_mlip_ase,
           "mlip-md-small": worker_mlip_md, "mace-ase": worker_mace_ase, "mace-ase-small": worker_mace_ase,
           "apax-ase": worker_apax_ase,
           "apax-md": worker_apax_md}


def run_worker(spec_path: str) -> None:
    with open(spec_path) as stream:
        spec = json.load(stream)
    result = WORKERS[spec["path"]](spec)
    if result["steps"]:
        per_step = result["seconds"] / result["steps"]
        result.update(steps_per_s=1.0 / per_step, us_per_atom_step=1e6 * per_step / spec["n_atoms"])
    with open(spec["result"], "w") as stream:
        json.dump(result, stream, indent=1)


# ================================================================ parent
_running_case: subprocess.Popen | None = None  # the case's process, its own session


def _stop_running_case(signum, frame) -> None:
    """SIGTERM (a stage's time limit): end the running case too. It runs in a session of its
    own, so a killed parent would otherwise leave it on the device (seen on the GPU: an
    orphaned 62,500-atom case slowed the next stage's cases 4 to 8 times)."""
    if _running_case is not None and _running_case.poll() is None:
        os.killpg(_running_case.pid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def run_case(python: str, spec: dict, timeout_s: float, log_path: str) -> dict:
    """One (path, size) in a fresh process of ``python``; killed after ``timeout_s``."""
    spec_path = os.path.join(spec["work_dir"], f"spec_{spec['path']}_{spec['n_atoms']}.json")
    spec["result"] = spec_path.replace("spec_", "result_")
    if os.path.exists(spec["result"]):
        os.remove(spec["result"])
    with open(spec_path, "w") as stream:
        json.dump(spec, stream, indent=1)
    env = dict(os.environ)
    # mlip's cases import mlip from this checkout; the inherited PYTHONPATH stays (a device
    # image may find torch or jax through it; replacing it broke the mace cases there).
    inherited = os.environ.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT if FRAMEWORK_OF[spec["path"]] == "mlip" else "",
                                                      inherited]))
    start = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen([python, os.path.abspath(__file__), "--worker", spec_path],
                                   stdout=log, stderr=subprocess.STDOUT, env=env, cwd=spec["work_dir"],
                                   start_new_session=True)
        global _running_case
        _running_case = process
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            return {"status": "failed", "reason": f"killed after the case limit of {timeout_s:.0f} s "
                                                  f"(--case-timeout-s); log {log_path}"}
    wall_s = time.monotonic() - start
    if process.returncode != 0 or not os.path.exists(spec["result"]):
        tail = open(log_path).read().strip().splitlines()[-1:] or [""]
        return {"status": "failed", "reason": f"exit {process.returncode}: {tail[0][:300]} (log {log_path})"}
    with open(spec["result"]) as stream:
        result = json.load(stream)
    result.update(status="ok", process_wall_s=round(wall_s, 1))
    t0, t1 = result.get("temperature_start_K"), result.get("temperature_end_K")
    if t1 is None or not math.isfinite(t1) or (t0 and t1 > 5 * t0):
        result["warning"] = f"temperature went from {t0} K to {t1} K: unstable dynamics"
    return result


def train_mlip_model(args, model: str, family: str, source: str, e0s: str, backbone: dict | None) -> str:
    """Run dir of an mlip model trained for --train-seconds on 200 frames of ``source`` (cached)."""
    import yaml

    # The backbone's digest in the name: an edited configs/small.yaml trains afresh.
    digest = hashlib.sha1(json.dumps(backbone, sort_keys=True).encode()).hexdigest()[:8]
    run_dir = os.path.join(args.work_dir, f"{model.replace('-', '_')}_{family}_{args.train_seconds:g}s_{digest}")
    if os.path.exists(os.path.join(run_dir, "best.msgpack")):
        return run_dir
    config = {"run_dir": run_dir, "seed": 0,
              "data": {"train": f"{source}@0:200", "valid": f"{source}@200:220", "e0s": e0s},
              "training": {"max_epochs": 100000, "max_time": args.train_seconds, "batch_size": 5,
                           "optimizer": {"name": "adam", "learning_rate": 0.02, "amsgrad": True},
                           "progress_bar": False, "plots": False}}
    if backbone:
        config["model"] = {"backbone": backbone}
    config_path = os.path.join(args.work_dir, f"{model}_{family}.yaml")
    with open(config_path, "w") as stream:
        yaml.safe_dump(config, stream)
    print(f"training {model}'s {family} model ({args.train_seconds:g} s) ...", flush=True)
    with open(os.path.join(args.work_dir, f"{model}_{family}_train.log"), "w") as log:
        subprocess.run([sys.executable, "-m", "mlip.cli", "train", config_path], check=True,
                       stdout=log, stderr=subprocess.STDOUT, cwd=args.work_dir)
    return run_dir


def train_molecule_models(args, mace_python_dir: str, frameworks: set) -> dict:
    """Briefly trained ethanol models for mlip and mace-torch (untimed, cached in --work-dir).

    A random-weight model does not hold a molecule together: over the 1 ps of a 2000-step
    case ethanol's atoms fly apart or into each other, which stops mlip's on-device MD
    (close-contact check) and shrinks the neighbour counts being timed. The MACE models
    (mlip's default and small ones, mace-torch's) are therefore trained for a short while
    on 200 frames. For the metal cells, of which only tens to hundreds of steps of the
    default model are timed on CPU, only the small model is trained (see main).
    """

    models = {}
    e0_file = os.path.join(ROOT, "data", "ethanol_gfn2_e0s.json")
    for model, backbone in (("mlip", None), ("mlip-small", small_backbone())):
        if model in frameworks:
            models[model] = train_mlip_model(args, model, "molecule", ETHANOL, e0_file, backbone)
    if "mace" in frameworks:
        models["mace"] = train_mace_model(args, mace_python_dir, "molecule", ETHANOL, e0s_argument(e0_file),
                                          MACE_ARCHITECTURE, args.mace_epochs)
    if "mace-small" in frameworks:
        models["mace-small"] = train_mace_model(args, mace_python_dir, "molecule", ETHANOL,
                                                e0s_argument(e0_file), mace_small_architecture(),
                                                args.mace_small_epochs)
    return models


def e0s_argument(e0_file: str) -> str:
    """mace_run_train's --E0s dictionary from mlip's JSON file of isolated-atom energies."""
    return "{" + ",".join(f"{z}:{v}" for z, v in json.load(open(e0_file)).items()) + "}"


def train_mace_model(args, mace_python_dir: str, family: str, source: str, e0s: str,
                     architecture: dict, epochs: int) -> str:
    """A mace-torch model trained by mace_run_train for ``epochs`` on 200 frames (cached)."""
    import ase.io

    digest = hashlib.sha1(json.dumps(architecture, sort_keys=True).encode()).hexdigest()[:8]
    mace_dir = os.path.join(args.work_dir, f"mace_{family}_{epochs}ep_{digest}")
    model_path = os.path.join(mace_dir, f"{family}.model")
    if os.path.exists(model_path):
        return model_path
    os.makedirs(mace_dir, exist_ok=True)
    for name, index in (("train", "0:200"), ("valid", "200:220")):
        ase.io.write(os.path.join(mace_dir, f"{name}.extxyz"), ase.io.read(source, index))
    a = architecture
    arguments = [
        f"--name={family}", f"--train_file={mace_dir}/train.extxyz", f"--valid_file={mace_dir}/valid.extxyz",
        f"--E0s={e0s}", "--energy_key=REF_energy", "--forces_key=REF_forces", "--model=MACE",
        f"--num_channels={a['num_channels']}", f"--max_L={a['max_L']}", f"--max_ell={a['max_ell']}",
        f"--correlation={a['correlation']}", f"--r_max={a['r_max']}",
        f"--num_interactions={a['num_interactions']}", f"--num_radial_basis={a['num_bessel']}",
        f"--num_cutoff_basis={a['num_polynomial_cutoff']}", f"--radial_MLP={a['radial_mlp']}",
        f"--MLP_irreps={a['readout_hidden']}x0e", "--batch_size=5", "--valid_batch_size=20",
        "--lr=0.01", "--amsgrad", "--default_dtype=float32", "--device=cpu", "--seed=0",
        f"--max_num_epochs={epochs}", f"--checkpoints_dir={mace_dir}/checkpoints",
        f"--model_dir={mace_dir}", f"--log_dir={mace_dir}/logs", f"--results_dir={mace_dir}/results",
    ]
    print(f"training mace-torch's {family} model ({epochs} epochs) ...", flush=True)
    with open(os.path.join(mace_dir, "train.log"), "w") as log:
        subprocess.run([os.path.join(mace_python_dir, "mace_run_train"), *arguments], check=True,
                       stdout=log, stderr=subprocess.STDOUT, cwd=mace_dir)
    return model_path


def train_apax_models(args, python_dir: str) -> dict:
    """apax needs a trained model directory: its GMNN, briefly trained per family.

    One epoch leaves a model under which ethanol heats from 200 K to thousands of K
    within 300 steps; ``--apax-epochs`` (default 20) on 200 frames keeps the measured
    steps physical. Training time does not enter the benchmark.
    """
    import ase.io
    import yaml
    from ase.calculators.singlepoint import SinglePointCalculator

    models = {}
    for family, source in (("molecule", ETHANOL), ("metal", CUAU)):
        directory = os.path.join(args.work_dir, f"apax_{family}_{args.apax_epochs}ep")
        models[family] = os.path.join(directory, "model")
        done_marker = os.path.join(directory, "trained")
        if os.path.exists(done_marker):
            continue
        os.makedirs(directory, exist_ok=True)
        frames = ase.io.read(source, ":220")
        for atoms in frames:  # apax reads labels from calculator results
            energy, forces = atoms.info.pop("REF_energy"), atoms.arrays.pop("REF_forces")
            atoms.info.pop("REF_stress", None)
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        ase.io.write(os.path.join(directory, "train.extxyz"), frames[:200], format="extxyz")
        ase.io.write(os.path.join(directory, "valid.extxyz"), frames[200:], format="extxyz")
        config = {"n_epochs": args.apax_epochs, "seed": 0,
                  "data": {"directory": directory, "experiment": "model",
                           "train_data_path": os.path.join(directory, "train.extxyz"),
                           "val_data_path": os.path.join(directory, "valid.extxyz"),
                           "batch_size": 8, "valid_batch_size": 20},
                  "model": APAX_MODEL,
                  "loss": [{"name": "energy"}, {"name": "forces", "weight": 4.0}],
                  "progress_bar": {"disable_epoch_pbar": True, "disable_batch_pbar": True}}
        config_path = os.path.join(directory, "config.yaml")
        with open(config_path, "w") as stream:
            yaml.safe_dump(config, stream)
        print(f"training apax's {family} model ({args.apax_epochs} epochs on 200 frames) ...", flush=True)
        with open(os.path.join(directory, "train.log"), "w") as log:
            subprocess.run([os.path.join(python_dir, "apax"), "train", config_path], check=True,
                           stdout=log, stderr=subprocess.STDOUT, cwd=directory)
        open(done_marker, "w").close()
    return models


def predicted_skip(previous: dict, n_atoms: int, limit_s: float) -> str | None:
    """A reason to skip ``n_atoms`` given the path's result at the last smaller size, or None."""
    if previous is None:
        return None
    if previous["status"] != "ok":
        return f"skipped: failed or skipped at {previous['n_atoms']} atoms"
    per_step = previous["seconds"] / previous["steps"]
    if per_step > limit_s:
        return (f"skipped: one step took {per_step:.2f} s at {previous['n_atoms']} atoms "
                f"(> --step-limit-s {limit_s:g})")
    predicted = per_step * n_atoms / previous["n_atoms"]
    if predicted > limit_s:
        return (f"skipped: one step predicted {predicted:.1f} s from {per_step:.3f} s at "
                f"{previous['n_atoms']} atoms (> --step-limit-s {limit_s:g})")
    return None


def apax_block(results: list, n_atoms: int, args) -> int:
    """apax's n_inner: its default 500, fewer where a block would take over min_seconds / 4.

    apax checks its stop conditions only between blocks (a host round trip of ~15 ms on
    CPU), so blocks are kept as long as the time budget allows; the estimate is apax-ase's
    step time at the same size, else apax-md's at the last size scaled linearly.
    """
    estimate = None
    for row in reversed(results):
        if row["status"] != "ok" or family_of(row["n_atoms"]) != family_of(n_atoms):
            continue
        if row["path"] == "apax-ase" and row["n_atoms"] == n_atoms:
            estimate = row["seconds"] / row["steps"]
            break
        if row["path"] == "apax-md" and estimate is None:
            estimate = row["seconds"] / row["steps"] * n_atoms / row["n_atoms"]
    if estimate is None:
        return APAX_N_INNER
    block = int(args.min_seconds / 4 / estimate) // 10 * 10
    return max(args.block_steps, min(APAX_N_INNER, block))


def machine_info(device_note: str | None) -> dict:
    import jax

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(),
            "jax_devices (mlip)": [str(d) for d in jax.devices()],
            "jax_backend (mlip)": jax.default_backend()}
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        if gpus.returncode == 0 and gpus.stdout.strip():
            info["gpus"] = gpus.stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        pass
    if device_note:
        info["device_note"] = device_note
    return info


# ---------------------------------------------------------------- report
def _cell(row: dict | None) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return "skipped" if row["reason"].startswith("skipped") else "failed"
    mark = " ⚠" if "warning" in row else ""
    return f"{row['us_per_atom_step']:.3g} ({row['steps_per_s']:.3g}/s){mark}"


def markdown(report: dict) -> str:
    meta, results = report["meta"], report["results"]
    sizes = meta["sizes"]
    machine = meta["machine"]
    lines = [
        f"Run on {meta['date']}, {machine['cpu']} ({machine['cores']} cores), jax devices "
        f"{', '.join(machine['jax_devices (mlip)'])}"
        + (f"; {machine['device_note']}" if machine.get("device_note") else "") + ".",
        f"Command: `{meta['command']}`",
        f"Protocol: NVE, {meta['timestep_fs']} fs, Maxwell-Boltzmann {meta['temperature_K']:g} K; "
        f"compilation and up to {meta['warmup_steps']} warm-up steps (on-device MD: one block) not "
        f"timed; then at least {meta['min_seconds']:g} s or {meta['max_steps']} steps per case; "
        f"larger sizes skipped once a step takes over {meta['step_limit_s']:g} s.",
        f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        "",
        "µs per atom per step (steps per second); lower is faster in the first number.",
        "",
        "| path | params (molecule / metal) | " + " | ".join(f"{n} atoms" for n in sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for path in meta["paths"]:
        rows = {r["n_atoms"]: r for r in results if r["path"] == path}
        counts = {family_of(r["n_atoms"]): r["n_params"] for r in results
                  if r["path"] == path and "n_params" in r}
        params = " / ".join(f"{counts[f] / 1000:.0f}k" for f in ("molecule", "metal") if f in counts)
        lines.append(f"| {describe(path, meta)} | {params} | "
                     + " | ".join(_cell(rows.get(n)) for n in sizes) + " |")
    notes = [f"- {r['path']} at {r['n_atoms']} atoms: {r['reason']}" for r in results if r["status"] != "ok"]
    notes += [f"- {r['path']} at {r['n_atoms']} atoms: {r['warning']}" for r in results if "warning" in r]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def write_docs(report: dict, section: str, plot_path: str | None) -> None:
    path = os.path.join(ROOT, "docs", "benchmarks.md")
    body = markdown(report)
    if plot_path:
        image = os.path.relpath(plot_path, os.path.dirname(path))
        body += f"\n\n![µs per atom per step against atoms]({image})"
    replace_marked_section(path, f"<!-- {section}:start -->", f"<!-- {section}:end -->", body, "MD speed")


def plot(report: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    styles = {"mlip-ase": ("C0", "o", "-"), "mlip-md": ("C0", "s", "--"), "mlip-ase-small": ("C1", "o", "-"),
              "mlip-md-small": ("C1", "s", "--"), "mace-ase": ("C3", "^", "-"),
              "mace-ase-small": ("C4", "^", "-"),
              "apax-ase": ("C2", "v", "-"), "apax-md": ("C2", "D", "--")}
    for name in report["meta"]["paths"]:
        rows = sorted((r for r in report["results"] if r["path"] == name and r["status"] == "ok"),
                      key=lambda r: r["n_atoms"])
        if not rows:
            continue
        color, marker, line = styles[name]
        axis.plot([r["n_atoms"] for r in rows], [r["us_per_atom_step"] for r in rows], color=color,
                  marker=marker, linestyle=line, label=describe(name, report["meta"]))
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("atoms (9: ethanol; others: periodic fcc Cu/Au)")
    axis.set_ylabel("µs per atom per MD step")
    machine = report["meta"]["machine"]
    title = f"MD speed, {machine['cpu']} ({machine['cores']} cores)"
    if machine.get("device_note"):
        title += f"\n{machine['device_note']}"
    axis.set_title(title, fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="create the peer venvs and exit")
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--peer-dir", default="/work/peers")
    parser.add_argument("--work-dir", default="/tmp/mlip-benchmark-md")
    parser.add_argument("--sizes", type=int, nargs="+", default=[9, 108, 500, 2048, 4000],
                        help="atom counts: 9 is ethanol, others must be 4 k^3 (fcc supercells)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {PATHS}")
    parser.add_argument("--min-seconds", type=float, default=20.0, help="time at least this long per case")
    parser.add_argument("--max-steps", type=int, default=2000, help="... or at most this many steps")
    parser.add_argument("--warmup-steps", type=int, default=10,
                        help="ASE paths: untimed steps first (at least 2, fewer than this once "
                             "they take over --min-seconds / 2)")
    parser.add_argument("--block-steps", type=int, default=50,
                        help="steps per compiled block of mlip-md (and the least apax-md uses)")
    parser.add_argument("--step-limit-s", type=float, default=30.0,
                        help="skip a path's larger sizes once one step takes (or would take) longer")
    parser.add_argument("--case-timeout-s", type=float, default=1200.0, help="kill a case after this long")
    parser.add_argument("--overlap", choices=["auto", "on", "off"], default="auto",
                        help="mlip-md: neighbour lists built on a host thread while the device steps "
                             "(auto: on off the CPU)")
    parser.add_argument("--timestep-fs", type=float, default=0.5)
    parser.add_argument("--temperature-K", type=float, default=300.0)
    parser.add_argument("--skin", type=float, default=0.5,
                        help="mlip's neighbour-list skin, Å (mlip.md's default), for both mlip paths")
    parser.add_argument("--apax-skin", type=float, default=0.5, help="apax's dr_threshold (its default), Å")
    parser.add_argument("--apax-epochs", type=int, default=20,
                        help="epochs of apax's (untimed) training on 200 frames per family")
    parser.add_argument("--train-seconds", type=float, default=90.0,
                        help="mlip's (untimed) training of its ethanol model")
    parser.add_argument("--mace-epochs", type=int, default=10,
                        help="epochs of mace-torch's (untimed) training of its ethanol model")
    parser.add_argument("--mace-small-epochs", type=int, default=10,
                        help="epochs of mace-torch's (untimed) training of mlip's small architecture, "
                             "per family")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="mace-torch's intra-op threads (default: torch's own choice, one per "
                             "core; on a loaded machine 2 threads ran 25x slower than 1)")
    parser.add_argument("--mace-device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device-note", default=None,
                        help="free text recorded with the machine (e.g. 'GPU run on one H100')")
    parser.add_argument("--json", default=os.path.join(ROOT, "docs", "benchmark_md.json"))
    parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "benchmark_md.png"))
    parser.add_argument("--section", default="md-speed",
                        help="marker name in docs/benchmarks.md (e.g. md-speed-gpu for a second table)")
    parser.add_argument("--no-docs", action="store_true",
                        help="write the JSON and plot only to --work-dir; leave docs/ alone")
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return
    if args.setup:
        setup(args.peer_dir)
        return
    signal.signal(signal.SIGTERM, _stop_running_case)
    paths = [p for p in args.paths.split(",") if p]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise SystemExit(f"error: --paths: unknown {unknown}; known: {list(PATHS)}")
    sizes = sorted(set(args.sizes))
    args.work_dir = os.path.abspath(args.work_dir)
    os.makedirs(args.work_dir, exist_ok=True)
    if args.no_docs:
        args.json = os.path.join(args.work_dir, "benchmark_md.json")
        args.plot = os.path.join(args.work_dir, "benchmark_md.png")
    pythons = {"mlip": sys.executable, "mace": os.path.join(args.peer_dir, "mace-venv", "bin", "python"),
               "apax": os.path.join(args.peer_dir, "apax-venv", "bin", "python")}
    for path in paths:
        if not os.path.exists(pythons[FRAMEWORK_OF[path]]):
            raise SystemExit(f"error: {pythons[FRAMEWORK_OF[path]]} not found; run with --setup first")

    import ase.io

    structures, neighbours = {}, {}
    for n in sizes:
        atoms = build_system(n, args.temperature_K, args.seed)
        structures[n] = os.path.join(args.work_dir, f"system_{n}.extxyz")
        ase.io.write(structures[n], atoms, format="extxyz")
        neighbours.setdefault(family_of(n), average_neighbours(atoms, MACE_ARCHITECTURE["r_max"]))
    apax_models, molecule_models = {}, {}
    frameworks = {FRAMEWORK_OF[p] for p in paths}
    # Which models the paths need: mlip's and mace-torch's default ones, their small ones.
    for name in ("mlip", "mace"):
        if any(p.startswith(name) and p.endswith("-small") for p in paths):
            frameworks.add(f"{name}-small")
        if not any(p.startswith(name) and not p.endswith("-small") for p in paths):
            frameworks.discard(name)
    if "apax" in frameworks:
        apax_models = train_apax_models(args, os.path.dirname(pythons["apax"]))
    if 9 in sizes and frameworks & {"mlip", "mlip-small", "mace", "mace-small"}:
        molecule_models = train_molecule_models(args, os.path.dirname(pythons["mace"]), frameworks)
    small_metal_models = {}
    if any(family_of(n) == "metal" for n in sizes):
        # The small model is fast enough that hundreds of steps are timed per metal
        # cell, and random weights let atoms collide within them (at 108 atoms, after
        # 372 steps): it is trained briefly on the shipped EMT Cu/Au frames instead.
        if "mlip-small" in frameworks:
            small_metal_models["mlip-small"] = train_mlip_model(args, "mlip-small", "metal", CUAU, "fit",
                                                                small_backbone())
        if "mace-small" in frameworks:
            small_metal_models["mace-small"] = train_mace_model(
                args, os.path.dirname(pythons["mace"]), "metal", CUAU, "average", mace_small_architecture(),
                args.mace_small_epochs)

    results, last = [], {}
    for n in sizes:
        for path in paths:
            key = (path, family_of(n))
            reason = predicted_skip(last.get(key), n, args.step_limit_s) if family_of(n) == "metal" else None
            if reason:
                row = {"path": path, "n_atoms": n, "status": "skipped", "reason": reason}
            else:
                print(f"{path} at {n} atoms ...", flush=True)
                spec = {"path": path, "n_atoms": n, "family": family_of(n), "structure": structures[n],
                        "timestep_fs": args.timestep_fs, "min_seconds": args.min_seconds,
                        "max_steps": args.max_steps, "warmup_steps": args.warmup_steps,
                        "block_steps": args.block_steps, "step_limit_s": args.step_limit_s,
                        "skin": args.skin, "apax_skin": args.apax_skin, "seed": args.seed,
                        "overlap": args.overlap,
                        "avg_num_neighbors": neighbours[family_of(n)], "mace_device": args.mace_device,
                        "torch_threads": args.torch_threads,
                        "apax_model": apax_models.get(family_of(n)), "work_dir": args.work_dir}
                small = path.endswith("-small")
                if family_of(n) == "molecule":
                    spec["mlip_model"] = molecule_models.get("mlip-small" if small else "mlip")
                    spec["mace_model"] = molecule_models.get("mace-small" if small else "mace")
                elif small:  # trained for the metal too
                    spec["mlip_model"] = small_metal_models.get("mlip-small")
                    spec["mace_model"] = small_metal_models.get("mace-small")
                if path == "apax-md":
                    spec["block_steps"] = apax_block(results, n, args)
                log_path = os.path.join(args.work_dir, f"{path}_{n}.log")
                row = {"path": path, "n_atoms": n,
                       **run_case(pythons[FRAMEWORK_OF[path]], spec, args.case_timeout_s, log_path)}
            row["system"] = "ethanol" if n == 9 else f"fcc Cu/Au {n}"
            last[key] = row
            results.append(row)
            with open(os.path.join(args.work_dir, "partial.json"), "w") as stream:  # a killed run keeps its rows
                json.dump({"results": results, "partial": True}, stream, indent=1)
            summary = (f"{row['us_per_atom_step']:.3g} µs/atom/step, {row['steps_per_s']:.3g} steps/s "
                       f"({row['steps']} steps, warm-up {row['warmup_s']:.1f} s)"
                       if row["status"] == "ok" else row["reason"])
            print(f"  {path} {n}: {summary}", flush=True)

    report = {"meta": {"date": datetime.date.today().isoformat(),
                       "command": "python scripts/benchmark_md.py " + " ".join(
                           argv if argv is not None else sys.argv[1:]),
                       "machine": machine_info(args.device_note), "versions": versions(args.peer_dir),
                       "sizes": sizes, "paths": paths, "timestep_fs": args.timestep_fs,
                       "temperature_K": args.temperature_K, "min_seconds": args.min_seconds,
                       "max_steps": args.max_steps, "warmup_steps": args.warmup_steps,
                       "block_steps": args.block_steps, "step_limit_s": args.step_limit_s,
                       "mlip_skin": args.skin, "apax_skin": args.apax_skin, "mlip_overlap": args.overlap,
                       "torch_threads": args.torch_threads,
                       "apax_training": f"{args.apax_epochs} epochs on 200 frames per family",
                       "ethanol_training": f"mlip {args.train_seconds:g} s, mace-torch {args.mace_epochs} "
                                           "epochs on 200 frames; metal cells: random weights, except "
                                           f"mlip's small model: {args.train_seconds:g} s on 200 EMT frames; "
                                           f"mace-torch's small model: {args.mace_small_epochs} epochs on "
                                           "200 frames per family",
                       "avg_num_neighbors": neighbours, "energy_scale_eV": ENERGY_SCALE,
                       "mace_architecture": MACE_ARCHITECTURE, "apax_model": APAX_MODEL,
                       "mlip_small_backbone": small_backbone() if "mlip-small" in frameworks else None,
                       "mace_small_architecture": (mace_small_architecture() if "mace-small" in frameworks
                                                   else None),
                       "systems": {"9": "ethanol, frame 0 of data/ethanol_gfn2_500K.extxyz, non-periodic",
                                   "other": f"cubic fcc supercell, a = {FCC_A} Å, Cu with "
                                            f"{AU_FRACTION:.0%} Au on random sites, periodic"},
                       "paths_described": {p: describe(p, {"mlip_skin": args.skin,
                                                           "apax_skin": args.apax_skin}) for p in paths}},
              "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as stream:
        json.dump(report, stream, indent=1)
    plot(report, args.plot)
    if not args.no_docs:
        write_docs(report, args.section, args.plot)
    print(markdown(report))


if __name__ == "__main__":
    main()

"""`mlip md`: a trained model, a starting structure and an ensemble in; trajectory, log and summary out.

Everything is written as the run goes, so a stopped or failed run keeps what it
computed: the trajectory (extxyz) gets a frame at the start and every ``interval``
steps, flushed and synced; the log gets a line per frame; the summary JSON is
written atomically at the end, whether the run completed, was stopped by
Ctrl-C / SIGTERM (it stops at the next block, about ``block_steps`` steps, and
writes the final frame), or stopped on an instability (the last valid frame).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Optional

import numpy as np

from mlip.errors import DataError, MLIPError

LOG_COLUMNS = ("step", "time_ps", "potential_energy", "kinetic_energy", "total_energy", "temperature_K",
               "conserved_energy", "pressure_GPa", "volume")


def read_structure(spec: str):
    """One structure from ``path`` (last frame) or ``path@index``."""
    import ase.io

    from mlip.data.reader import split_data_spec

    path, index = split_data_spec(spec)
    if not os.path.exists(path):
        raise DataError(f"{path}: structure file not found")
    try:
        atoms = ase.io.read(path, index=index if index is not None else -1)
    except Exception as error:  # ASE raises many kinds; the user needs the file and the reason
        raise DataError(f"{spec}: cannot read a structure ({type(error).__name__}: {error})") from error
    if isinstance(atoms, list):
        if len(atoms) != 1:
            raise DataError(f"{spec}: selects {len(atoms)} structures; give one, e.g. {path}@0")
        atoms = atoms[0]
    return atoms


class _StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks; a second one interrupts."""

    def __init__(self):
        self.requested: Optional[str] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            signal.signal(signum, self._previous[signum])
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def run_md(potential, params, atoms, *, trajectory: str, steps: int, interval: int, progress_bar: bool = True,
           **md_settings) -> dict:
    """Run MD with outputs beside ``trajectory`` (``<stem>.log``, ``<stem>_summary.json``)."""
    import ase.io

    from mlip.md.simulation import MDStabilityError, MolecularDynamics
    from mlip.training.checkpoint import write_json

    if steps < 0 or interval < 1:
        raise MLIPError(f"need steps >= 0 and interval >= 1 (got {steps}, {interval})")
    stem = os.path.splitext(trajectory)[0]
    log_path, summary_path = stem + ".log", stem + "_summary.json"
    for path in (trajectory, log_path):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
    md = MolecularDynamics(potential, params, atoms, **md_settings)
    timestep_fs = md.timestep_fs
    started = time.perf_counter()
    stop_reason = "completed"
    compile_seconds = None
    first_chunk_steps = 0

    with open(trajectory, "w") as trajectory_file, open(log_path, "w") as log_file, _StopRequest() as stop:
        log_file.write("# " + " ".join(LOG_COLUMNS) + "   (eV, K, GPa, Å³; energies absolute)\n")

        def write_frame():
            thermo = md.current_thermo()
            frame = md.atoms
            frame.info.update({"step": md.steps_done, "time_fs": md.steps_done * timestep_fs,
                               "temperature_K": thermo["temperature_K"]})
            ase.io.write(trajectory_file, frame, format="extxyz")
            _sync(trajectory_file)
            kinetic = thermo["kinetic_energy"]
            row = [md.steps_done, md.steps_done * timestep_fs / 1000, thermo["potential_energy"], kinetic,
                   thermo["potential_energy"] + kinetic, thermo["temperature_K"], thermo["conserved_energy"],
                   thermo["pressure_GPa"], thermo["volume"]]
            log_file.write(" ".join(f"{v:d}" if isinstance(v, int) else f"{v:.10g}" for v in row) + "\n")
            _sync(log_file)
            return thermo

        thermo = write_frame()
        bar = _progress_bar(steps, progress_bar)
        try:
            while md.steps_done < steps:
                if stop.requested:
                    stop_reason = f"stopped by {stop.requested}"
                    break
                to_next_frame = interval - md.steps_done % interval
                chunk = min(md.block_steps, to_next_frame, steps - md.steps_done)
                chunk_start = time.perf_counter()
                md.run(chunk)
                if compile_seconds is None:
                    compile_seconds, first_chunk_steps = time.perf_counter() - chunk_start, chunk
                if md.steps_done % interval == 0 or md.steps_done == steps:
                    thermo = write_frame()
                if bar is not None:
                    bar.update(chunk)
                    bar.set_postfix(T=f"{thermo['temperature_K']:.0f}K",
                                    E=f"{thermo['conserved_energy']:.4f}eV", refresh=False)
        except MDStabilityError as error:
            stop_reason = f"unstable: {error}"
            raise
        finally:
            if bar is not None:
                bar.close()
            if md.steps_done % interval and not stop_reason.startswith("completed"):
                write_frame()  # the last valid state of a stopped run
            elapsed = time.perf_counter() - started
            summary = _summary(md, stop_reason, elapsed, compile_seconds, first_chunk_steps)
            summary.update({"trajectory": trajectory, "log": log_path})
            write_json(summary_path, summary)
    return summary


def _summary(md, stop_reason: str, elapsed: float, compile_seconds: Optional[float],
             first_chunk_steps: int) -> dict:
    table = md.thermo_table()
    half = len(table["step"]) // 2
    summary = {"steps": md.steps_done, "stop_reason": stop_reason, "ensemble": md.ensemble.name,
               "n_atoms": md.n_atoms, "timestep_fs": md.timestep_fs, "elapsed_s": round(elapsed, 3),
               "neighbour_list_builds": md.neighbour_list_builds, "compilations": md.compilations,
               # host seconds the steps waited for neighbour lists; overlapped builds hide most of it
               "neighbour_wait_s": round(md.neighbour_wait_s, 3),
               "overlap_neighbour_lists": md.overlap_neighbour_lists}
    measured = elapsed - (compile_seconds or 0.0)
    later_steps = md.steps_done - first_chunk_steps
    if later_steps > 0 and measured > 0:
        # The first block includes compilation; speed is measured over the rest.
        summary["steps_per_second"] = later_steps / measured
        summary["microseconds_per_atom_step"] = 1e6 * measured / later_steps / md.n_atoms
    if len(table["step"]) >= 2:
        summary["conserved_energy_drift_eV_per_atom_per_ps"] = md.energy_drift()
        summary["mean_temperature_K_second_half"] = float(np.mean(table["temperature_K"][half:]))
        if md.ensemble.changes_cell:
            summary["mean_pressure_GPa_second_half"] = float(np.mean(table["pressure_GPa"][half:]))
            summary["mean_volume_second_half"] = float(np.mean(table["volume"][half:]))
    return summary


def _sync(handle) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", dynamic_ncols=True, mininterval=0.5)

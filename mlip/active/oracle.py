"""The oracle of active learning: any ASE calculator, named by import path, run in worker processes.

    oracle: {calculator: ase.calculators.emt.EMT, kwargs: {}, workers: 2, timeout_s: 600}
    oracle: {calculator: tblite.ase.TBLite, kwargs: {method: GFN2-xTB}}

`check_oracle` imports the class and builds one calculator in this process, so a bad
path or bad keyword arguments are a clear `ConfigError` before anything runs. Labels
are computed by ``workers`` long-lived processes (started with ``spawn``: JAX in the
parent is multithreaded, and forking it is unsafe), each building its calculator once.
A label that raises is a failure with the error's text; one that runs past
``timeout_s`` has its worker terminated (a calculator stuck in native code cannot be
interrupted any other way) and replaced, and is a failure too. Failures are reported,
never raised: the caller records and skips them.
"""

from __future__ import annotations

import dataclasses
import importlib
import multiprocessing
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from mlip.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LabelResult:
    """The oracle's answer for one structure: its labels, or why there are none."""

    index: int
    energy: Optional[float] = None
    forces: Optional[np.ndarray] = None
    stress: Optional[np.ndarray] = None  # 3x3, eV/Å³ (periodic structures only)
    error: Optional[str] = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def calculator_class(path: str):
    """The class at ``module.Name``; a `ConfigError` naming the path if it cannot be imported."""
    module_name, _, name = str(path).rpartition(".")
    if not module_name:
        raise ConfigError(f"oracle.calculator '{path}': give a full import path, e.g. ase.calculators.emt.EMT")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or whatever the module raises on import
        raise ConfigError(f"oracle.calculator '{path}': cannot import module '{module_name}' "
                          f"({type(error).__name__}: {error})") from None
    try:
        return getattr(module, name)
    except AttributeError:
        raise ConfigError(f"oracle.calculator '{path}': module '{module_name}' has no '{name}'") from None


def make_calculator(path: str, kwargs: dict):
    """A calculator instance; bad keyword arguments are a `ConfigError`."""
    cls = calculator_class(path)
    try:
        return cls(**(kwargs or {}))
    except Exception as error:  # TypeError for unknown keywords, ValueError & co. for bad values
        raise ConfigError(f"oracle.kwargs {kwargs!r} for {path}: {type(error).__name__}: {error}") from None


def check_oracle(path: str, kwargs: dict) -> None:
    """Fail early: the class imports and accepts the keyword arguments."""
    make_calculator(path, kwargs)


def compute_labels(calculator, atoms) -> dict:
    """Energy, forces (and stress for a fully periodic cell) of ``atoms`` with ``calculator``."""
    atoms = atoms.copy()
    atoms.calc = calculator
    labels = {"energy": float(atoms.get_potential_energy()), "forces": np.asarray(atoms.get_forces(), np.float64)}
    if np.all(atoms.pbc):
        labels["stress"] = np.asarray(atoms.get_stress(voigt=False), np.float64)
    for name, value in labels.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"the oracle returned a non-finite {name}")
    return labels


def _worker(path: str, kwargs: dict, tasks, results) -> None:
    """Worker process: one calculator, labels until it reads None."""
    try:
        calculator = make_calculator(path, kwargs)
    except Exception as error:
        calculator, setup_error = None, f"{type(error).__name__}: {error}"
    while True:
        task = tasks.recv()
        if task is None:
            return
        index, atoms = task
        start = time.monotonic()
        try:
            if calculator is None:
                raise RuntimeError(setup_error)
            results.send((index, compute_labels(calculator, atoms), None, time.monotonic() - start))
        except Exception as error:
            results.send((index, None, f"{type(error).__name__}: {error}", time.monotonic() - start))


class Oracle:
    """Labels structures with an ASE calculator in ``workers`` processes, each label within ``timeout_s``."""

    def __init__(self, calculator: str, kwargs: Optional[dict] = None, workers: int = 1,
                 timeout_s: float = 3600.0):
        self.path, self.kwargs = calculator, dict(kwargs or {})
        self.workers, self.timeout_s = max(int(workers), 1), float(timeout_s)
        self.name = calculator.rpartition(".")[2] + (f"({', '.join(f'{k}={v}' for k, v in self.kwargs.items())})"
                                                     if self.kwargs else "")
        check_oracle(self.path, self.kwargs)

    def _start_worker(self, context):
        task_read, task_write = context.Pipe(duplex=False)
        result_read, result_write = context.Pipe(duplex=False)
        process = context.Process(target=_worker, args=(self.path, self.kwargs, task_read, result_write), daemon=True)
        process.start()
        return {"process": process, "tasks": task_write, "results": result_read, "busy": None}

    def label(self, structures: Sequence, on_result: Optional[Callable[[LabelResult], None]] = None) -> list:
        """`LabelResult` of every structure, in order; ``on_result`` sees each as it arrives (to store
        it at once)."""
        context = multiprocessing.get_context("spawn")
        pending = list(range(len(structures)))[::-1]
        results: dict[int, LabelResult] = {}
        workers = [self._start_worker(context) for _ in range(min(self.workers, len(structures)))]

        def finish(result: LabelResult) -> None:
            results[result.index] = result
            if on_result is not None:
                on_result(result)

        try:
            while len(results) < len(structures):
                for worker in workers:
                    if worker["busy"] is None and pending:
                        index = pending.pop()
                        worker["tasks"].send((index, structures[index]))
                        worker["busy"] = (index, time.monotonic())
                for slot, worker in enumerate(workers):
                    if worker["busy"] is None:
                        continue
                    index, started = worker["busy"]
                    answer = None
                    if worker["results"].poll(0.01):
                        try:
                            answer = worker["results"].recv()
                        except (EOFError, OSError):  # the process is gone (crashed in native code, killed)
                            pass
                    if answer is not None:
                        _, labels, error, seconds = answer
                        worker["busy"] = None
                        finish(LabelResult(index, error=error, seconds=seconds) if labels is None else
                               LabelResult(index, labels["energy"], labels["forces"], labels.get("stress"),
                                           seconds=seconds))
                    elif not worker["process"].is_alive() or time.monotonic() - started > self.timeout_s:
                        died = not worker["process"].is_alive()
                        worker["process"].terminate()
                        worker["process"].join()
                        finish(LabelResult(index, error="the oracle's process died" if died else
                                           f"timed out after {self.timeout_s:g} s",
                                           seconds=time.monotonic() - started))
                        workers[slot] = self._start_worker(context)
        finally:
            for worker in workers:
                try:
                    worker["tasks"].send(None)
                except (BrokenPipeError, OSError):
                    pass
                worker["process"].join(timeout=5)
                if worker["process"].is_alive():
                    worker["process"].terminate()
        return [results[i] for i in range(len(structures))]


def labelled_atoms(atoms, result: LabelResult, extra_info: Optional[dict[str, Any]] = None):
    """A copy of ``atoms`` carrying the oracle's labels as REF_energy, REF_forces (and REF_stress)."""
    copy = atoms.copy()
    copy.calc = None
    copy.info["REF_energy"] = result.energy
    copy.arrays["REF_forces"] = np.asarray(result.forces)
    if result.stress is not None:
        copy.info["REF_stress"] = np.asarray(result.stress)
    copy.info.update(extra_info or {})
    return copy

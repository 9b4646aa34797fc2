"""ASE calculators for the active-learning tests: importable by path from the oracle's worker processes."""

import os
import time

from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT


class CountingEMT(EMT):
    """EMT that appends one line per calculation to ``log`` (to count the oracle's calls across processes)."""

    def __init__(self, log: str, fail_above_x: float = None, sleep_above_x: float = None, fail_ids=(), **kwargs):
        super().__init__(**kwargs)
        self.log, self.fail_above_x, self.sleep_above_x = log, fail_above_x, sleep_above_x
        self.fail_ids = set(fail_ids)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        x = float(atoms.positions[0, 0])
        identifier = atoms.info.get("candidate_id")
        if identifier in self.fail_ids:
            raise RuntimeError(f"SCF did not converge (candidate {identifier} is in fail_ids)")
        if self.sleep_above_x is not None and x > self.sleep_above_x:
            time.sleep(60)
        if self.fail_above_x is not None and x > self.fail_above_x:
            raise RuntimeError(f"SCF did not converge (x = {x:.2f})")
        with open(self.log, "a") as stream:
            stream.write(f"{x:.6f}\n")
            stream.flush()
            os.fsync(stream.fileno())
        super().calculate(atoms, properties, system_changes)


class NotACalculator(Calculator):
    def __init__(self, required_argument):
        super().__init__()

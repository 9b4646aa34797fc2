"""What the benchmark scripts share: the peers' pinned venvs (mace-torch, apax) and machine facts.

Standard library only: the benchmark scripts import it in every venv they run in.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

PEER_VERSIONS = {"torch": "2.13.0", "mace-torch": "0.3.16", "apax": "0.14.0"}


def setup(peer_dir: str) -> None:
    """Create ``peer_dir/mace-venv`` and ``peer_dir/apax-venv`` where missing."""
    os.makedirs(peer_dir, exist_ok=True)
    mace = os.path.join(peer_dir, "mace-venv")
    apax = os.path.join(peer_dir, "apax-venv")
    if not os.path.exists(mace):
        subprocess.run([sys.executable, "-m", "venv", mace], check=True)
        # torch==2.13.0 first: the CPU build on disk; a bare `torch` pulls a CUDA build of several GB.
        subprocess.run([os.path.join(mace, "bin", "pip"), "install", f"torch=={PEER_VERSIONS['torch']}"],
                       check=True)
        subprocess.run([os.path.join(mace, "bin", "pip"), "install",
                        f"mace-torch=={PEER_VERSIONS['mace-torch']}"], check=True)
    if not os.path.exists(apax):
        subprocess.run([sys.executable, "-m", "venv", apax], check=True)
        subprocess.run([os.path.join(apax, "bin", "pip"), "install", f"apax=={PEER_VERSIONS['apax']}"],
                       check=True)


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else platform's guess)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions(peer_dir: str) -> dict:
    """Installed versions of the packages that matter, in mlip's venv and each peer's."""
    found = {}
    for name, python, packages in (("mlip", sys.executable, ["jax", "jaxlib", "e3nn-jax", "flax", "ase"]),
                                   ("mace", os.path.join(peer_dir, "mace-venv", "bin", "python"),
                                    ["mace-torch", "torch", "e3nn", "ase"]),
                                   ("apax", os.path.join(peer_dir, "apax-venv", "bin", "python"),
                                    ["apax", "jax", "ase"])):
        if not os.path.exists(python):
            continue
        code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
                f"{packages!r}}}))")
        try:
            installed = json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True,
                                                  check=True).stdout)
            found.update({f"{package} ({name})": version for package, version in installed.items()})
        except subprocess.CalledProcessError:
            pass
    return found

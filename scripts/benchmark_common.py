"""What the benchmark scripts share: peers' pinned venvs, machine facts, budgeted runs, doc sections.

Standard library only: the benchmark scripts import it in every venv they run in.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Callable

PEER_VERSIONS = {"torch": "2.13.0", "mace-torch": "0.3.16", "apax": "0.14.0"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_backbone() -> dict:
    """``model.backbone`` of configs/small.yaml, mlip's small model for fast MD (needs PyYAML)."""
    import yaml

    with open(os.path.join(ROOT, "configs", "small.yaml")) as stream:
        return yaml.safe_load(stream)["model"]["backbone"]


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


def versions(peer_dir: str | None = None) -> dict:
    """Installed versions of the packages that matter, in mlip's venv and each peer's (none without peer_dir)."""
    found = {}
    venvs = [("mlip", sys.executable, ["jax", "jaxlib", "e3nn-jax", "flax", "ase"])]
    if peer_dir is not None:
        venvs += [("mace", os.path.join(peer_dir, "mace-venv", "bin", "python"), ["mace-torch", "torch", "e3nn", "ase"]),
                  ("apax", os.path.join(peer_dir, "apax-venv", "bin", "python"), ["apax", "jax", "ase"])]
    for name, python, packages in venvs:
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


def run_with_budget(command: list, budget_s: float, log_path: str, env=None, grace_s: float = 0.0,
                    cwd: str | None = None, count_epochs: Callable[[], int] | None = None) -> dict:
    """Run ``command``; interrupt it when ``budget_s + grace_s`` seconds have passed.

    ``count_epochs``, where given, reads from the process's own logs how many epochs it
    has finished; it is polled every 0.25 s and the result's ``epoch_end_s`` holds the
    seconds from start at which each epoch was first seen finished.
    """
    start = time.monotonic()
    epoch_end_s: list[float] = []
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                   start_new_session=True)
        stopped = False
        while process.poll() is None:
            elapsed = time.monotonic() - start
            if count_epochs is not None:
                epoch_end_s.extend([round(elapsed, 2)] * max(0, count_epochs() - len(epoch_end_s)))
            if elapsed > budget_s + grace_s:
                stopped = True
                # SIGTERM, not SIGINT: a process started from a background job may ignore SIGINT.
                os.killpg(process.pid, signal.SIGTERM)
                try:  # a few seconds to exit cleanly; then it is killed
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                break
            time.sleep(0.25 if count_epochs is not None else 0.5)
    result = {"wall_s": round(time.monotonic() - start, 1), "stopped_at_budget": stopped,
              "returncode": process.returncode}
    if count_epochs is not None:
        result["epoch_end_s"] = epoch_end_s
    return result


def publish_table(text: str, marker: str, heading: str, docs: bool) -> int:
    """Print a table; with ``docs``, also put it in docs/benchmarks.md between ``<!-- marker -->`` and
    ``<!-- /marker -->`` (a new ``## heading`` where they are missing)."""
    print(text)
    if docs:
        replace_marked_section(os.path.join(ROOT, "docs", "benchmarks.md"), f"<!-- {marker} -->",
                               f"<!-- /{marker} -->", text, heading)
    return 0


def replace_marked_section(path: str, begin: str, end: str, section: str, heading: str) -> None:
    """Put ``section`` between the markers ``begin`` and ``end`` of the Markdown file ``path``.

    Where the file or the markers are missing, a new ``## heading`` with the markers is
    appended; the rest of the file is kept as it is.
    """
    text = open(path).read() if os.path.exists(path) else ""
    if begin in text and end in text:
        text = text[:text.index(begin) + len(begin)] + "\n" + section + "\n" + text[text.index(end):]
    else:
        text += f"\n## {heading}\n\n{begin}\n{section}\n{end}\n"
    with open(path, "w") as stream:
        stream.write(text)

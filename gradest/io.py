"""Files a run leaves on disk, written safely, and the metadata to reproduce it (docs/estimators.md §4).

Every file is written atomically (a temporary file in the same directory, then `os.replace`), so an interrupted
run leaves either the previous file or the new one, never half of one, and concurrent writers never read a
half-written file. Light on purpose: the trainer and the data loaders import it, so it imports no pandas,
matplotlib or seaborn (report.py, which draws the figures, builds on it).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch

import gradest

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "directory_lock", "git_state", "run_metadata",
           "write_json"]


# ------------------------------------------------------------------------------------------------ atomic writes
def atomic_write(path, write: Callable[[BinaryIO], None]) -> Path:
    """Create or replace `path` atomically with what `write(handle)` writes to a binary file handle; the parent
    folder is created if needed. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    # os.open with mode 0o666, not tempfile (0o600): the result gets the permissions the umask gives a plain open()
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path, data: dict) -> Path:
    # default=str: paths and other plain values in a config dict are written as text, not refused
    return atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


@contextlib.contextmanager
def directory_lock(directory, what: str = "run"):
    """Hold `directory/.lock` exclusively while a process writes into the directory: a second process that wants
    it (another `gradest run --out` the same directory) is refused at once, with one line, before it writes
    anything. The lock is the kernel's (flock): it goes with the process that held it, even a killed one."""
    import fcntl
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as handle:  # (a refused process changes nothing, not even its time)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            from gradest.errors import GradestError
            raise GradestError(f"another process is writing to {directory}/ (it holds {directory}/.lock); wait for "
                               f"that {what} to end, or choose another directory") from None
        yield


# ----------------------------------------------------------------------------------------------------- metadata
def git_state(directory=None) -> dict:
    """The commit of the git checkout holding `directory` (default: the gradest package) and whether the checkout
    differs from it; "unknown" when the package is not tracked by git (an installed wheel, no git at all)."""
    directory = Path(directory or Path(gradest.__file__).parent)

    def git(*args) -> str:
        return subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        # a package installed inside some other repository (a venv in a checkout) is not tracked by it
        if not git("ls-files", "--", "."):
            raise ValueError("package not tracked")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError, ValueError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": commit, "dirty": dirty}


def _version(package: str) -> str | None:
    """An installed package's version without importing it (pandas is slow to import and the trainer needs none
    of it here); its own `__version__` if it is imported already."""
    module = sys.modules.get(package)
    if module is not None and hasattr(module, "__version__"):
        return module.__version__
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The processor's name (Linux: /proc/cpuinfo's "model name"), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# environment variables that change which kernels the CPU runs, hence the last bits of the numbers
NUMERIC_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "MKL_CBWR")


def environment() -> dict:
    """What, beside the seed and the code, decides a run's numbers on this machine: torch's thread count (a sum
    split over more threads is added in another order), the processor, torch's math settings and the numeric
    libraries' environment variables. The same seed gives bit-identical numbers only where all of these agree."""
    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "cpu": cpu_model(), "machine": platform.machine(), "cores": os.cpu_count(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "env": {name: os.environ[name] for name in NUMERIC_ENV if name in os.environ}}


def run_metadata(config: dict, seed, command: list[str] | None = None) -> dict:
    """What is needed to reproduce a run: its configuration, seed, library versions, source commit, the
    environment that decides its last bits (`environment`), time and command line (default: this process's)."""
    return {
        "config": config,
        "seed": seed,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                     "pandas": _version("pandas"), "gradest": gradest.__version__},
        "git": git_state(),
        "environment": environment(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv if command is None else command),
    }

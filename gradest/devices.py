"""The devices of this machine, and a device name checked against them.

A run asked for a device torch cannot use (`cuda` on a CPU-only torch, `cuda:3` on a one-GPU machine, a typo)
would otherwise end in a traceback from deep inside torch, after the data is loaded; checking the name first
turns it into one line naming the devices there are.
"""

from __future__ import annotations

import os

import torch

from gradest.errors import GradestError


def available_devices() -> list[str]:
    """The devices of this machine, as torch names them ("cuda" is "cuda:0")."""
    devices = ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    return devices + (["mps"] if torch.backends.mps.is_available() else [])


def check_device(name: str) -> str:
    """`name` as one of `available_devices()` (`cuda` -> `cuda:0`, `cpu:0` -> `cpu`), or a GradestError naming
    the devices of this machine."""
    available = available_devices()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise GradestError(f"unknown device '{name}'; valid here: {', '.join(available)}") from None
    canonical = f"cuda:{device.index or 0}" if device.type == "cuda" else device.type
    if canonical not in available:
        raise GradestError(f"device '{name}' is not available on this machine; valid here: {', '.join(available)}")
    return canonical


DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device_type(name: str) -> str:
    """A device torch knows, whether or not this machine has it: a study spec may ask for `cuda` on a laptop (whether
    the cells' machine has it is checked when they run: `check_device`)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise GradestError(f"unknown device '{name}'; valid: {', '.join(DEVICE_TYPES)}, cuda:N")
    return name


def world_size() -> int:
    """The processes of this run: torchrun's WORLD_SIZE, else 1 (also for a value that is no positive integer)."""
    world = os.environ.get("WORLD_SIZE", "1")
    return int(world) if world.isdigit() and int(world) > 0 else 1

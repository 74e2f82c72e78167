"""`python -m gradest.titan.train ...` (under torchrun): torchtitan's own trainer entry point (`torchtitan.train`'s
`main`, every argument as it takes them), on a machine WITHOUT an accelerator.

torchtitan 0.3 picks its device once, at import (`torchtitan.tools.utils.get_device_info`: the available
accelerator, else "cuda"), so on a CPU-only machine its trainer fails at `torch.cuda.set_device` ("module
'torch._C' has no attribute '_cuda_setDevice'"). This launcher sets that choice to the CPU before torchtitan's
modules read it, with a stand-in for the `torch.cuda` calls its trainer makes on its device module (set_device, the
memory monitor's statistics: no device memory to report, so 0). torchtitan 0.3 also calls
`torch.distributed.set_timeout` after the first step, which torch 2.13 does not have (it has the private
`distributed_c10d._set_pg_timeout`, which does the same); the launcher supplies it from that where it is missing,
on any machine. Then it runs torchtitan's `main` unchanged: its
config manager, process group (gloo on the CPU), model build, parallelisms, optimizer, checkpointing and loop. On a
machine with an accelerator it only runs `main` (use `torchtitan.train` itself there).
"""

from __future__ import annotations

import types

import torch


def _cpu_device_module() -> types.SimpleNamespace:
    """What torchtitan's trainer calls on its device module, for the CPU."""
    return types.SimpleNamespace(
        set_device=lambda device: None,
        current_device=lambda: 0,
        device_count=lambda: 1,
        is_available=lambda: True,
        synchronize=lambda *args: None,
        empty_cache=lambda: None,
        reset_peak_memory_stats=lambda *args: None,
        memory_stats=lambda *args: {},
        get_device_name=lambda *args: "cpu",
        get_device_properties=lambda *args: types.SimpleNamespace(total_memory=1, name="cpu"),
        manual_seed=torch.manual_seed,
        manual_seed_all=torch.manual_seed,
    )


def use_cpu() -> None:
    """Point torchtitan's device choice at the CPU when no accelerator is available (before its modules are
    imported: they copy the choice at import)."""
    if torch.accelerator.is_available():
        return
    from torchtitan.tools import utils
    utils.device_type, utils.device_module = "cpu", _cpu_device_module()


def supply_set_timeout() -> None:
    """`torch.distributed.set_timeout(timeout, group)`, which torchtitan 0.3 calls, from torch's private
    `_set_pg_timeout` where this torch lacks it."""
    import torch.distributed as dist
    if not hasattr(dist, "set_timeout"):
        from torch.distributed.distributed_c10d import _set_pg_timeout
        dist.set_timeout = _set_pg_timeout


def main() -> None:
    use_cpu()
    supply_set_timeout()
    from torchtitan.train import main as titan_main
    titan_main()


if __name__ == "__main__":
    main()

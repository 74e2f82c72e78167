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

Before torchtitan's trainer starts (no process group, no model, nothing built), the launcher parses the command line
with torchtitan's own config manager and checks gradest's settings (`check_settings`): every
`--override.imports gradest.titan.converter.gradest_routing={...}` entry and every block a `GradestRouting`
converter already rewrote, against each MoE block of the chosen model flavour (its router's top_k, num_experts,
score_func, route_norm) and the expert-parallel degree (`parallelism.expert_parallel_degree`). A bad setting (an
unknown or unparsable estimator, `exact`, another k than top_k, a dense estimator under expert parallelism, a
sigmoid-scored model without a rule, an unknown key), or a missing torchtitan, is one line `error: ...` on stderr and
exit status 2. Under torchrun every worker runs the check (it is cheap and needs no process group) and exits 2;
only rank 0 prints the line, and torchrun then reports the failed workers in its own summary. The same command
with `python -m gradest.titan.train` instead of `torchrun ... -m gradest.titan.train` prints the line alone.
"""

from __future__ import annotations

import os
import sys
import types

import torch

from gradest.errors import GradestError, one_line

ROUTING_OVERRIDE = "gradest.titan.converter.gradest_routing"
ROUTING_KEYS = ("estimator", "sigmoid")  # what gradest_routing takes


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


def override_entries(config) -> list[tuple[str, dict]]:
    """(target, kwargs) of every `--override.imports` entry."""
    return [(e, {}) if isinstance(e, str) else (e[0], dict(e[1] or {})) for e in config.override.imports]


def check_settings(config) -> list[str]:
    """gradest's routing settings in a parsed torchtitan trainer config, checked against the model flavour's MoE
    blocks and the expert-parallel degree (module docstring); returns the estimator specs checked (none: gradest is
    not selected). Raises a one-line GradestError."""
    from gradest.titan.converter import check_spec
    from gradest.titan.models import torchtitan_moe
    from gradest.titan.patching import router_estimator
    moe = torchtitan_moe()
    settings = []
    for target, kwargs in override_entries(config):
        if target != ROUTING_OVERRIDE:
            continue
        unknown = sorted(set(kwargs) - set(ROUTING_KEYS))
        if unknown:
            raise GradestError(f"{ROUTING_OVERRIDE} has no setting '{unknown[0]}'; valid: {', '.join(ROUTING_KEYS)}")
        settings.append((kwargs.get("estimator", "sparsemixer"), kwargs.get("sigmoid", "refuse")))
    spec = config.model_spec
    blocks = [] if spec is None else [(fqn, block) for fqn, block, _, _ in spec.model.traverse(moe.MoE.Config)]
    settings += [(b.gradest_estimator, b.gradest_sigmoid) for _, b in blocks if hasattr(b, "gradest_estimator")]
    if settings and not blocks:
        raise GradestError(f"{ROUTING_OVERRIDE} routes MoE blocks, but the model of this config has none; valid: a "
                           f"torchtitan MoE model, e.g. --config gradest_qwen3_moe_tiny")
    ep = int(config.parallelism.expert_parallel_degree)
    routers = [(fqn, block.router) for fqn, block in blocks]
    for estimator, sigmoid in dict.fromkeys(settings):
        check_spec(estimator, sigmoid)
        router_estimator(estimator, routers, sigmoid=sigmoid, expert_parallel=ep > 1)
    return [estimator for estimator, _ in settings]


def precheck(args: list[str] | None = None) -> None:
    """Parse the command line as torchtitan's trainer will and `check_settings`; on a GradestError print one line
    (rank 0 only) and exit 2, before anything is started."""
    from gradest.titan.models import torchtitan_moe
    try:
        try:
            import torchtitan.tools.utils  # noqa: F401  (what use_cpu sets)
        except ImportError:
            torchtitan_moe()  # the one line naming the extra
        use_cpu()  # before torchtitan's trainer modules are imported: they copy the device choice
        torchtitan_moe()  # the version and layout
        from torchtitan.config import ConfigManager
        config = ConfigManager().parse_args(args)
        check_settings(config)
    except GradestError as error:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    precheck()  # points torchtitan at the CPU first (use_cpu)
    supply_set_timeout()
    from torchtitan.train import main as titan_main
    titan_main()


if __name__ == "__main__":
    main()

"""Route torchtitan mixture-of-experts models with gradest's estimators (`pip install 'gradest[titan]'`).

    import gradest.titan
    gradest.titan.patch(model, "sparsemixer")   # every torchtitan MoE block now routes with SparseMixer

Modules: `patching` (patch, score_loss, routing_log_prob; its docstring says what torchtitan's native rule is, what
replaces it, and what is supported and refused), `converter` (the model converter and the --override.imports
entries that turn gradest on in torchtitan's trainer; the score-function loss), `models` (torchtitan's MoE layout
check, small Qwen3-MoE models), `data` (tiny-shakespeare for torchtitan's trainer), `config_registry` (trainer
configs, `--module gradest.titan`), `train` (torchtitan's trainer entry point on a CPU-only machine, its settings checked first), `probe`
(the router-gradient probe on one torchtitan MoE layer, `gradest compare --problem titan`). Every module
imports torchtitan; the core package never imports this one.
"""

from gradest.titan.models import build_model, forward, moe_blocks, qwen3_moe_config, torchtitan_moe
from gradest.titan.patching import Patched, TitanBlock, live_blocks, patch, routing_log_prob, score_loss

"""Route Hugging Face `transformers` mixture-of-experts models with gradest's estimators (`pip install 'gradest[hf]'`).

    import gradest.hf
    gradest.hf.patch(model, "sparsemixer-v2")   # every MoE block gradest recognises now routes with SparseMixer-v2

Modules: `patching` (patch, score_loss, routing_log_prob; its docstring says what each architecture's native rule
is and what replaces it), `families` (how each kind of block is routed), `models` (the architecture table
SUPPORTED, and the configs and models gradest builds or loads), `train` (the back-end of `gradest run --hf`),
`probe` (the router-gradient probe of `gradest compare --problem hf` and `gradest doctor`). transformers is
imported on first use.
"""

from gradest.hf.families import routing_dtype
from gradest.hf.models import (CAUSAL, CONFIG_ERRORS, NAMED, SUPPORTED, TESTED_TRANSFORMERS, Architecture,
                               architecture_of, built_config, config_error, config_from_directory, config_from_file,
                               load_model, model_from_config, moe_blocks, named_config, pretrained_model,
                               tiny_config, training_config)
from gradest.hf.patching import Patched, PatchedBlock, patch, routing_log_prob, score_loss

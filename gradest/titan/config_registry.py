"""torchtitan trainer configs (`--module gradest.titan --config NAME`) for a small Qwen3-MoE on the bundled
tiny-shakespeare, on the CPU. Train one with a gradest estimator through torchtitan's own trainer:

    torchrun --nproc-per-node 1 -m torchtitan.train --module gradest.titan --config gradest_qwen3_moe_tiny \\
        --override.imports 'gradest.titan.converter.gradest_routing={"estimator": "sparsemixer"}' \\
        --training.steps 40 --dump_folder runs/titan-sparsemixer

What makes it run on a CPU (torchtitan's own configs assume CUDA and its test assets): the attention is torchtitan's
causal ScaledDotProductAttention (flex attention's backward does not run on a CPU; `gradest.titan.models
.sdpa_attention`); the tokenizer and data are the bundled tiny-shakespeare (`gradest.titan.data`); torch.compile
and activation checkpointing are off; everything else (trainer, optimizer, schedule, gloo process group,
checkpointing, FSDP across processes) is torchtitan's.
"""

from __future__ import annotations

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.config import TrainingConfig
from torchtitan.models.qwen3 import model_registry
from torchtitan.trainer import Trainer

from gradest.titan.data import CharTokenizer, ShakespeareDataLoader
from gradest.titan.models import qwen3_moe_config

# the model: Qwen3-MoE's blocks (torchtitan's `debugmodel_moe`, shrunk), 4 experts, top-1, 65 characters
TINY = dict(dim=64, layers=2, heads=4, kv_heads=2, head_dim=16, hidden=128, experts=4, top_k=1, vocab=65,
            max_seq_len=128)


def gradest_qwen3_moe_tiny() -> Trainer.Config:
    """The tiny Qwen3-MoE on tiny-shakespeare, routed natively (add gradest's routing with the override in the
    module docstring), AdamW 3e-3, batches of 16 x 64 characters, a checkpoint every 20 steps and at the end."""
    spec = model_registry("debugmodel_moe")
    spec.flavor = "gradest-tiny"
    spec.model = qwen3_moe_config(**TINY)
    return Trainer.Config(
        model_spec=spec,
        hf_assets_path=".",
        loss=CrossEntropyLoss.Config(),
        tokenizer=CharTokenizer.Config(),
        dataloader=ShakespeareDataLoader.Config(),
        metrics=MetricsProcessor.Config(log_freq=1),
        optimizer=default_adamw(lr=3e-3),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=2),
        training=TrainingConfig(local_batch_size=16, seq_len=64, steps=40, max_norm=1.0),
        checkpoint=CheckpointManager.Config(enable=True, interval=20, last_save_model_only=False,
                                           initial_load_model_only=False),  # (no initial load: silences its warning)
        activation_checkpoint=None,
    )

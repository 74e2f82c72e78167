"""gradest in torchtitan's trainer: a model converter, the same as two command-line overrides, and the
score-function loss.

torchtitan's extension point for changing a model is the model converter (`ModelConfigConverter`, as float8 and
LoRA are): it rewrites the model's config tree before the model is built. `GradestRouting` replaces every MoE
block's config (`MoE.Config`) by a subclass whose `build` builds torchtitan's own block and patches its routing
(`gradest.titan.patch`), so the block is routed by gradest from birth: before torchtitan parallelizes, shards,
initialises (`init_states` re-initialises a stateful estimator's buffers) or loads a checkpoint into it.

    from torchtitan.models.qwen3 import model_registry
    model_spec = model_registry("debugmodel_moe", converters=[GradestRouting.Config(estimator="sparsemixer")])

From torchtitan's command line, on any of its configs, through its override mechanism (applied to the config tree
before anything is built):

    --override.imports 'gradest.titan.converter.gradest_routing={"estimator": "sparsemixer-v2:jitter_eps=0.01"}'
    --override.imports gradest.titan.converter.gradest_score_loss     # reinforce: the loss with the score term

(`{"sigmoid": "softmax"}` converts a sigmoid-scored model: gradest/titan/patching.py). An estimator spec that does
not parse, or cannot route the blocks, stops the run in one line (GradestError) when the model is built, before
any step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchtitan.components.loss import IGNORE_INDEX, BaseLoss
from torchtitan.config.override import override
from torchtitan.models.common.moe import MoE
from torchtitan.protocols.model import ModelConfigConverter

from gradest.engines import blocks_score_loss
from gradest.errors import GradestError
from gradest.estimators import parse_spec
from gradest.titan.patching import SIGMOID_RULES, live_blocks, patch

_CLASSES: dict[type, type] = {}


def routed_class(config_cls: type) -> type:
    """The subclass of an MoE block's config class that builds the block patched by gradest (cached per class)."""
    if config_cls in _CLASSES:
        return _CLASSES[config_cls]

    @dataclass(kw_only=True, slots=True)
    class GradestConfig(config_cls):  # type: ignore[valid-type, misc]
        gradest_estimator: str = "sparsemixer"
        """the estimator spec that routes the block (`gradest list`)"""
        gradest_sigmoid: str = "refuse"
        """a sigmoid-scored router: refuse, or route its logits by softmax"""
        gradest_name: str = ""
        """the block's name in the model, for messages"""

        def build(self, **kwargs):
            block = config_cls.build(self, **kwargs)
            patched = patch(block, self.gradest_estimator, sigmoid=self.gradest_sigmoid)
            for routed in patched.blocks:
                routed.name = self.gradest_name or routed.name
            block.gradest_patched = patched
            return block

    GradestConfig.__name__ = GradestConfig.__qualname__ = f"Gradest{config_cls.__name__}"
    _CLASSES[config_cls] = GradestConfig
    return GradestConfig


def routed_config(config: MoE.Config, estimator: str, sigmoid: str = "refuse", name: str = "") -> MoE.Config:
    """`config` (an MoE block's) as one whose block gradest routes with `estimator`."""
    check_spec(estimator, sigmoid)
    import dataclasses
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    fields.update(gradest_estimator=estimator, gradest_sigmoid=sigmoid, gradest_name=name)
    return routed_class(type(config))(**fields)


def check_spec(estimator, sigmoid: str) -> None:
    if not isinstance(estimator, str) or parse_spec(estimator) is None:
        raise GradestError(f"estimator must be an estimator spec such as 'sparsemixer' (gradest list), got "
                           f"{estimator!r}")
    if sigmoid not in SIGMOID_RULES:
        raise GradestError(f"sigmoid must be one of {', '.join(SIGMOID_RULES)}, got {sigmoid!r}")


class GradestRouting(ModelConfigConverter):
    """Route every MoE block of a torchtitan model with a gradest estimator (module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(ModelConfigConverter.Config):
        estimator: str = "sparsemixer"
        """the estimator spec, e.g. sparsemixer or sparsemixer-v2:jitter_eps=0.01 (`gradest list`)"""
        sigmoid: str = "refuse"
        """sigmoid-scored routers (DeepSeek-V3): refuse, or softmax (route the same logits by softmax)"""

    def __init__(self, config: Config, **kwargs):
        check_spec(config.estimator, config.sigmoid)
        self.config = config

    def convert(self, model_config):
        found = list(model_config.traverse(MoE.Config))
        if not found:
            raise GradestError(f"no MoE block in {type(model_config).__name__}; valid: a torchtitan MoE model")
        for fqn, config, parent, attribute in found:
            new = routed_config(config, self.config.estimator, self.config.sigmoid, fqn)
            if parent is None:
                model_config = new
            elif isinstance(parent, list):
                parent[attribute] = new
            else:
                setattr(parent, attribute, new)
        return model_config


@override(target=MoE.Config, description="gradest: route the MoE block with a gradest estimator")
def gradest_routing(config: MoE.Config, estimator: str = "sparsemixer", sigmoid: str = "refuse") -> MoE.Config:
    """`--override.imports 'gradest.titan.converter.gradest_routing={"estimator": "..."}'`: the converter's
    rewrite of one MoE block's config, from torchtitan's command line."""
    return routed_config(config, estimator, sigmoid)


# ------------------------------------------------------------------------------------------------------- the loss
class ScoreFunctionLoss(BaseLoss):
    """torchtitan's cross-entropy (sum over valid tokens / the global count of valid tokens), computed per
    sequence so that a score-function estimator (reinforce) gets its term: `with_score(f_b, log P_b)` with f_b
    sequence b's share of the loss and log P_b the log-probability of the routing sampled for its tokens, summed
    over every block patched in this process. Its value is torchtitan's loss; with any other estimator (or none)
    its gradient is too."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        global_vocab_size: int | None = None
        """unused (no tensor-parallel loss); kept so that it can stand in for CrossEntropyLoss's config"""

    def __init__(self, config: Config, *, compile_config=None):
        self.config = config

    def __call__(self, pred: torch.Tensor, labels: torch.Tensor, global_valid_tokens: torch.Tensor | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        token = F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1), reduction="none",
                                ignore_index=IGNORE_INDEX).view(labels.shape)
        per_sequence = token.sum(-1)
        if global_valid_tokens is not None:
            per_sequence = per_sequence / global_valid_tokens
        blocks = live_blocks()
        if blocks:
            per_sequence = blocks_score_loss(blocks, per_sequence)
        return per_sequence.sum(), {}


@override(target=BaseLoss.Config, description="gradest: the loss with a score-function estimator's term")
def gradest_score_loss(config: BaseLoss.Config) -> ScoreFunctionLoss.Config:
    """`--override.imports gradest.titan.converter.gradest_score_loss`: torchtitan's loss replaced by
    `ScoreFunctionLoss` (a chunked loss wrapper included: the model then computes its logits itself)."""
    return ScoreFunctionLoss.Config()

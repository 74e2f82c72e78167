"""torchtitan itself for gradest.titan: the import (one line when the extra is missing or its layout differs), the
MoE blocks of a model, and small Qwen3-MoE models (torchtitan's `debugmodel_moe` flavour, shrunk) for the tests,
the probe and the benchmark."""

from __future__ import annotations

import importlib

import torch
from torch import nn

from gradest.errors import GradestError

TESTED_TORCHTITAN = "0.3"  # the minor release whose layout gradest.titan is written against (tested with 0.3.0)
# what gradest.titan reads of torchtitan's MoE block and its router (torchtitan/models/common/moe.py)
BLOCK_ATTRIBUTES = ("router", "routed_experts", "shared_experts", "expert_bias_E", "tokens_per_expert_E")
ROUTER_ATTRIBUTES = ("gate", "num_experts", "top_k", "score_func", "route_norm", "route_scale", "num_expert_groups")


def torchtitan_moe():
    """torchtitan's MoE module (`torchtitan.models.common.moe`), checked against the layout gradest.titan reads."""
    try:
        torchtitan = importlib.import_module("torchtitan")
        moe = importlib.import_module("torchtitan.models.common.moe")
    except ImportError as error:
        raise GradestError(f"gradest.titan needs torchtitan {TESTED_TORCHTITAN}.x and triton ({error}); valid: "
                           f"pip install 'gradest[titan]'") from None
    version = getattr(torchtitan, "__version__", "unknown")
    missing = [name for name in ("MoE", "TokenChoiceTopKRouter", "RoutedExperts", "GroupedExperts")
               if not hasattr(moe, name)]
    if missing or not version.startswith(TESTED_TORCHTITAN + "."):
        raise GradestError(f"gradest.titan supports torchtitan {TESTED_TORCHTITAN}.x (its MoE router layout), "
                           f"installed: torchtitan {version}{' without ' + ', '.join(missing) if missing else ''}; "
                           f"valid: torchtitan>={TESTED_TORCHTITAN},<0.4")
    return moe


def check_layout(name: str, block: nn.Module) -> None:
    """One line when a torchtitan MoE block lacks what gradest.titan reads (another torchtitan layout)."""
    moe = torchtitan_moe()
    missing = [a for a in BLOCK_ATTRIBUTES if not hasattr(block, a)]
    router = getattr(block, "router", None)
    if router is not None:
        missing += [f"router.{a}" for a in ROUTER_ATTRIBUTES if not hasattr(router, a)]
        if not isinstance(router, moe.TokenChoiceTopKRouter):
            missing.append(f"router of type TokenChoiceTopKRouter (it is {type(router).__name__})")
    experts = getattr(block, "routed_experts", None)
    if experts is not None:
        missing += [f"routed_experts.{a}" for a in ("token_dispatcher", "inner_experts") if not hasattr(experts, a)]
    if missing:
        raise GradestError(f"{name or 'the model'}: this torchtitan MoE block's layout differs from torchtitan "
                           f"{TESTED_TORCHTITAN}'s (missing {', '.join(missing)}); valid: torchtitan>="
                           f"{TESTED_TORCHTITAN},<0.4")


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every torchtitan MoE block of `model` (the model itself when it is one), in module order;
    one line when there is none."""
    if not isinstance(model, nn.Module):
        raise GradestError(f"patch needs a torch nn.Module (a torchtitan model), got {type(model).__name__}")
    moe = torchtitan_moe()
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, moe.MoE)]
    if not found:
        raise GradestError(f"no torchtitan MoE block (torchtitan.models.common.moe.MoE) in {type(model).__name__}; "
                           f"valid: a torchtitan MoE model, e.g. Qwen3-MoE or DeepSeek-V3")
    for name, block in found:
        check_layout(name, block)
    return found


# ---------------------------------------------------------------------------------------- small Qwen3-MoE models
def qwen3_moe_config(*, dim: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 8,
                     hidden: int = 48, experts: int = 4, top_k: int = 2, vocab: int = 80, max_seq_len: int = 256,
                     attention: str = "sdpa"):
    """torchtitan's Qwen3-MoE `debugmodel_moe` flavour (softmax scores, `route_norm`), shrunk: the same blocks,
    built by torchtitan's own layer builder, at these sizes. `attention`: "flex" (torchtitan's default for
    language models; its backward does not run on CPU: "FlexAttention does not support backward on CPU") or
    "sdpa" (causal `F.scaled_dot_product_attention`, every sequence one document; `sdpa_attention`)."""
    torchtitan_moe()
    from torchtitan.models import qwen3
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    needed = ("_build_qwen3_moe_layers", "_qwen3_norm", "_LINEAR_INIT", "_EMBEDDING_INIT", "Qwen3Model")
    if not all(hasattr(qwen3, name) for name in needed):
        raise GradestError(f"torchtitan.models.qwen3 lacks {', '.join(n for n in needed if not hasattr(qwen3, n))}; "
                           f"valid: torchtitan>={TESTED_TORCHTITAN},<0.4")
    config = qwen3.Qwen3Model.Config(
        vocab_size=vocab, dim=dim, norm=qwen3._qwen3_norm(dim),
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=qwen3._EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=qwen3._LINEAR_INIT),
        layers=qwen3._build_qwen3_moe_layers(
            n_layers=layers, dim=dim, n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim, moe_hidden_dim=hidden,
            num_experts=experts, top_k=top_k, attn_backend="flex", moe_comm_backend="standard",
            rope=CosSinRoPE.Config(dim=head_dim, max_seq_len=max_seq_len, theta=1e6)))
    if attention not in ("sdpa", "flex"):
        raise GradestError(f"attention must be sdpa or flex, got {attention!r}")
    return sdpa_attention(config) if attention == "sdpa" else config


def sdpa_attention(config):
    """`config` with every FlexAttention (or Varlen) inner attention replaced by torchtitan's causal
    ScaledDotProductAttention: the CPU workaround (neither flex's nor varlen's backward runs on a CPU). Without
    masks each sequence is one causal document, which is what torchtitan's trainer then feeds (it builds masks only
    for flex and varlen)."""
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention, VarlenAttention
    for _, _, parent, attribute in list(config.traverse((FlexAttention.Config, VarlenAttention.Config))):
        setattr(parent, attribute, ScaledDotProductAttention.Config())
    return config


def build_model(config, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """A torchtitan model from its config as torchtitan's trainer builds one: on `meta`, `to_empty`, then
    `init_weights`; seeded, in `dtype`."""
    with torch.device("meta"):
        model = config.build()
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    return model.to(dtype)


def positions(batch: int, seq_len: int, device=None) -> torch.Tensor:
    """Each sequence one document: positions 0..seq_len-1 (what torchtitan's data loader gives)."""
    return torch.arange(seq_len, device=device).expand(batch, seq_len)


def forward(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The model's logits on `tokens` (batch, seq), each sequence one causal document, with the attention masks
    from `model.get_attention_masks` where its attention takes them (flex, varlen; sdpa is causal without)."""
    from torchtitan.models.common.attention import FlexAttention, VarlenAttention
    pos = positions(*tokens.shape, device=tokens.device)
    inner = getattr(model.config.first_attention, "inner_attention", None)
    masks = model.get_attention_masks(positions=pos) if isinstance(inner, (FlexAttention.Config,
                                                                          VarlenAttention.Config)) else None
    return model(tokens, positions=pos, attention_masks=masks)

"""The Hugging Face back-end of `gradest run --hf ARCH | --hf-config FILE | --hf-model DIR` (TrainConfig's `hf*`
settings): the lm task trains a transformers MoE causal LM instead of the Switch Transformer, every MoE block routed
by the estimator through `gradest.hf.patch` (`HFCausalLM`), with gradest.train's loop, files and resume; see
`hf_model_config` for the choices.
"""

from __future__ import annotations

import dataclasses

import torch

from gradest.errors import GradestError
from gradest.estimators import Estimator
from gradest.hf.models import (CAUSAL, CONFIG_ERRORS, SUPPORTED, check_config, check_setting_keys, config_error,
                               config_from_directory, config_from_file, model_from_config, pretrained_model,
                               training_config)
from gradest.hf.patching import native_hparams, patch, routing_log_prob
from gradest.model import SwitchConfig, token_cross_entropy
from gradest.tasks import DATA_SETTINGS, LanguageModelling

HF_SPECIAL_TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id")  # dropped: the characters have none


def hf_model_config(config, given: dict):
    """The transformers config of a Hugging Face run, checked up front (one-line GradestErrors): `--hf NAME` builds
    `training_config(NAME)`, `--hf-config FILE` the file's config, `--hf-model DIR` the saved model's, each with
    `hf_settings` over it. Sets the run's `top_k` (default: the model's `num_experts_per_tok`; given, it becomes the
    model's) and its `model` (only the sequence length `block_size` applies; `experts` mirrors the HF model's). The
    vocabulary is set by the task. `config` is the run's TrainConfig, `given` its `experts`, `block_size` and `omega`
    as given (gradest.config calls this while it is made, so this module does not import it)."""
    sources = [(option, value) for option, value in (("hf", config.hf), ("hf_config", config.hf_config),
                                                     ("hf_model", config.hf_model)) if value is not None]
    if len(sources) > 1:
        raise GradestError(f"{' and '.join(f'{o}={v}' for o, v in sources)} both choose the model; give one of "
                           f"hf (--hf), hf_config (--hf-config), hf_model (--hf-model)")
    if config.task != "lm":
        raise GradestError(f"a Hugging Face model trains as a causal LM on the lm task (tiny-shakespeare), not "
                           f"task={config.task}; valid: task lm")
    if not isinstance(config.hf_settings, dict):
        raise GradestError(f"hf_settings must be a table of config settings, got {config.hf_settings!r}")
    if isinstance(config.model, SwitchConfig):
        default = SwitchConfig()
        table = {f.name: getattr(config.model, f.name) for f in dataclasses.fields(SwitchConfig)
                 if f.name not in DATA_SETTINGS and getattr(config.model, f.name) != getattr(default, f.name)}
    else:
        table = dict(config.model or {})
    for key in table:
        if key not in ("block_size", "experts"):
            raise GradestError(f"model setting '{key}' is a Switch Transformer setting; a Hugging Face model takes "
                               f"its settings from its config (--hf-set KEY=VALUE); valid model setting: "
                               f"block_size")
    if given.get("omega") is not None or table.get("omega") is not None:
        raise GradestError("omega (--omega/--no-omega) is a Switch Transformer setting; valid with a Hugging Face "
                           "model: leave it unset")
    settings = dict(config.hf_settings)
    if config.hf is not None:
        name, where = config.hf, f"--hf {config.hf}"
        if name not in SUPPORTED:
            raise GradestError(f"unknown architecture '{name}'; valid: {', '.join(CAUSAL)}")
    elif config.hf_config is not None:
        cfg, where = config_from_file(config.hf_config, settings=settings), config.hf_config
        name = cfg.model_type
    else:
        cfg, where = config_from_directory(config.hf_model, settings), config.hf_model
        name = cfg.model_type
    if name not in CAUSAL:
        why = ("is an encoder-decoder; gradest run trains causal LMs (route it with gradest.hf.patch in your own "
               "loop)" if name in SUPPORTED else "has no mixture-of-experts block gradest.hf can route")
        raise GradestError(f"model_type '{name}' ({where}) {why}; valid: {', '.join(CAUSAL)}")
    if config.hf is not None:
        try:
            check_setting_keys(name, settings)  # (before the call: model_type=... would collide with its argument)
            cfg = training_config(name, **settings)
        except CONFIG_ERRORS as error:
            raise GradestError(f"cannot build the Hugging Face config: {config_error(error)}") from None
    check_config(cfg, f"the Hugging Face config ({where})")
    if config.hf_model is None:
        for key in HF_SPECIAL_TOKENS:
            setattr(cfg, key, None)
    experts_key = SUPPORTED[name].experts_key
    n = getattr(cfg, experts_key)
    if given.get("experts", table.get("experts", n)) != n:
        raise GradestError(f"experts={given.get('experts', table.get('experts'))} (--experts) but the Hugging Face "
                           f"model has {n}; set them in its config: --hf-set {experts_key}=N")
    if config.top_k is None:
        config.top_k = int(cfg.num_experts_per_tok)
    if not (isinstance(config.top_k, int) and 1 <= config.top_k <= n):
        raise GradestError(f"top_k={config.top_k} does not fit the model's {n} experts; valid: 1 <= top_k <= {n}")
    cfg.num_experts_per_tok = config.top_k
    if getattr(cfg, "router_aux_loss_coef", 0) and hasattr(cfg, "output_router_logits"):
        cfg.output_router_logits = True  # the model's own load-balancing loss
    block = given.get("block_size", table.get("block_size", SwitchConfig.block_size))
    longest = getattr(cfg, "max_position_embeddings", None)
    if isinstance(block, int) and longest is not None and block > longest:
        raise GradestError(f"block_size={block} is longer than the model's max_position_embeddings={longest}; "
                           f"valid: block_size <= {longest}")
    config.model = SwitchConfig(experts=n, block_size=block)
    return cfg


class HFLanguageModelling(LanguageModelling):
    """The lm task (tiny-shakespeare characters, the same batches) for a Hugging Face causal LM."""

    def model(self, estimator) -> "HFCausalLM":
        return HFCausalLM(self.config, estimator, self.corpus.vocab_size)


class HFCausalLM(torch.nn.Module):
    """A Hugging Face MoE causal LM routed by a gradest estimator (`gradest.hf.patch`), with what the Trainer asks
    of a model (`gradest.train.TrainableModel`): per-token cross-entropy, the auxiliary loss (the model's own router
    load-balancing loss, `router_aux_loss_coef` times its `aux_loss`, where the config has one), the log-probability
    of the sampled routing (`gradest.hf.routing_log_prob`), a zero-output pass, routing statistics per patched block
    (each block's logged too: `per_layer_metrics`), parameter counts.

    The characters' ids are the token ids. `hf` and `hf_config` models are randomly initialised with the corpus's
    vocabulary (the config's `vocab_size` is replaced); an `hf_model` keeps its weights and vocabulary, which must
    hold the corpus's ids."""

    per_layer_metrics = True  # metrics.csv has each patched block's routing too

    def __init__(self, config, estimator: Estimator | None, vocab_size: int):
        super().__init__()
        cfg = config.hf_transformers_config
        if config.hf_model is None:
            cfg.vocab_size = vocab_size
            self.hf_model = model_from_config(cfg)
        else:
            if cfg.vocab_size < vocab_size:
                raise GradestError(f"the model in {config.hf_model}/ has vocab_size={cfg.vocab_size}, fewer than "
                                   f"the corpus's {vocab_size} characters; valid: vocab_size >= {vocab_size}")
            self.hf_model = pretrained_model(config.hf_model, cfg, dtype=torch.float32)
        if estimator is None:  # built here, once: the model's own routing fixes some of its defaults
            estimator = config.build_estimator(defaults=lambda cls: native_hparams(self.hf_model, cls))
        self.patched = patch(self.hf_model, estimator)
        self.estimator = self.patched.estimator
        self.aux_coef = float(cfg.router_aux_loss_coef) if getattr(cfg, "output_router_logits", False) else 0.0
        self.last_aux = torch.zeros(())
        self.last_batch = 0

    def forward(self, idx, targets=None):
        """Logits (B, T, V) and, given targets, the per-token cross-entropy (B, T)."""
        self.last_batch = idx.shape[0]
        out = self.hf_model(input_ids=idx, use_cache=False)
        aux = out.get("aux_loss") if self.aux_coef else None
        self.last_aux = self.aux_coef * aux.float() if aux is not None else torch.zeros(())
        if targets is None:
            return out.logits, None
        return out.logits, token_cross_entropy(out.logits, targets, -100)

    def aux_loss(self):
        return self.last_aux

    def routing_log_prob(self):
        """log P of the routing sampled in the last forward, per sequence, over every patched block (None: no
        score-function estimator)."""
        return routing_log_prob(self.hf_model, self.last_batch)

    def zero_moe(self, zero: bool):
        self.patched.zeroed = zero

    def update_expert_bias(self, total=None) -> None:
        """Nothing to update: gradest's auxiliary-loss-free balancing is a setting of its own MoE layer (a model's
        own correction bias, e.g. DeepSeek-V3's, is left as the model has it)."""

    def routing_stats(self) -> list[dict]:
        """Each patched block's routing of the last forward: tokens per expert, the fraction of chosen experts
        among the top k of the logits, the entropy of softmax(z)."""
        blocks = [b for b in self.patched.blocks if b.routed is not None]
        parts = []
        with torch.no_grad():
            for b in blocks:
                z, choice = b.routed
                top = z.topk(choice.shape[-1], -1).indices
                hits = (choice.unsqueeze(-1) == top.unsqueeze(-2)).any(-1).sum()
                log_p = z.log_softmax(-1)
                entropy = -(log_p.exp() * log_p).sum(-1).mean()
                parts.append(torch.cat([torch.bincount(choice.reshape(-1), minlength=b.n).double(),
                                        hits.double().view(1), entropy.double().view(1)]))
            values = torch.cat(parts).tolist() if parts else []  # one host transfer
        stats, start = [], 0
        for b in blocks:
            *loads, hits, entropy = values[start:start + b.n + 2]
            start += b.n + 2
            stats.append({"tokens_per_expert": [int(c) for c in loads], "argmax_fraction": hits / max(1, sum(loads)),
                          "router_entropy": entropy})
        return stats

    def num_parameters(self, active: bool = False) -> int:
        """Parameters, or those a token uses (each patched block counts k of its experts)."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            for b in self.patched.blocks:
                per_expert = sum(p[0].numel() for p in b.block.experts.parameters() if p.dim() and p.shape[0] == b.n)
                total -= (b.n - b.k) * per_expert
        return total

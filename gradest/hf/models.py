"""The transformers MoE architectures gradest.hf routes, and the configs and models gradest builds or loads.

`SUPPORTED` is the one table of what differs per architecture: the MoE block class, its router submodule, the config
key of its expert count, how gradest routes it (its family, gradest/hf/families.py), the sizes of its tiny test
model and of the model `gradest run --hf` trains. Adding an architecture is one entry here, plus its equivalence
test against the native routing in tests/test_hf.py.

Configs and models, nothing downloaded: `tiny_config` (tests, `--hf NAME`), `named_config` (full-size architectures
by name, random weights), `training_config` (`gradest run --hf NAME`), `built_config` (either, as the probe builds
them), `config_from_file` (a config.json), `config_from_directory` (a saved model's), `model_from_config` (random
weights), `pretrained_model` (a saved model's weights), `load_model` (what the probe and `gradest doctor` run on).
Each refuses bad input in one line (GradestError).

transformers is imported on first use (`transformers_module`): the table, and the command line that lists its
names, load without the `hf` extra.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gradest.errors import GradestError
from gradest.estimators.base import integer_at_least
from gradest.hf.families import DeepSeekV3, Family, GptOss, PhiMoE, SoftmaxTopK, SwitchTransformers

try:  # a config field of the wrong type: transformers 5 validates configs with huggingface_hub's strict dataclasses
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # pragma: no cover - an older huggingface_hub, or none (the hf extra is missing)
    StrictDataclassError = ValueError
CONFIG_ERRORS = (TypeError, ValueError, KeyError, StrictDataclassError)  # what building a config from bad settings raises
TESTED_TRANSFORMERS = (5, 6)  # major versions [from, to); the `hf` extra asks for >= 5.24, the version tested


def transformers_module():
    """The transformers package, imported on first use (the `hf` extra)."""
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - the hf extra is missing
        raise GradestError("gradest.hf needs transformers 5.x: pip install 'gradest[hf]'") from error
    return transformers


def config_error(error: Exception) -> str:
    """A config error's message on one line (huggingface_hub's span several)."""
    return " ".join(str(error).split())


# -------------------------------------------------------------------------------------------- the architectures
# The tiny models (tests, `--hf NAME`): TINY under each causal architecture's `tiny`, TINY_EXPERTS experts. The models
# `gradest run --hf NAME` trains: the tiny one with TRAIN and each architecture's `train` over it, TRAIN_EXPERTS
# experts (a default run, 600 steps of 32 x 128 characters, takes about two minutes on 2 CPU cores).
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
TINY_EXPERTS = 4
TRAIN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4)
TRAIN_EXPERTS = 8


@dataclass(frozen=True)
class Architecture:
    """One transformers MoE architecture: where its routing is and how gradest replaces it."""

    model_type: str
    block: str  # "module.QualName" of the MoE block class
    router: str  # the block's router submodule
    experts_key: str  # the config key of the number of experts
    family: Family  # how gradest routes the block (gradest/hf/families.py)
    tiny: dict  # the tiny model's settings: over TINY for a causal LM, all of them for an encoder-decoder
    train: dict = field(default_factory=dict)  # `gradest run --hf` settings over TRAIN (causal LMs only)
    seq2seq: bool = False  # an encoder-decoder: probed, not trained by `gradest run`

    def router_of(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router)


def _block(model_type: str, name: str) -> str:
    return f"transformers.models.{model_type}.modeling_{model_type}.{name}"


SUPPORTED: dict[str, Architecture] = {a.model_type: a for a in (
    Architecture("mixtral", _block("mixtral", "MixtralSparseMoeBlock"), "gate", "num_local_experts",
                 SoftmaxTopK(renormalize=True, gates_in_logits_dtype=False), tiny={}),
    Architecture("qwen2_moe", _block("qwen2_moe", "Qwen2MoeSparseMoeBlock"), "gate", "num_experts",
                 SoftmaxTopK(renormalize=None, gates_in_logits_dtype=True),
                 tiny=dict(moe_intermediate_size=16, shared_expert_intermediate_size=32),
                 train=dict(moe_intermediate_size=128)),
    Architecture("qwen3_moe", _block("qwen3_moe", "Qwen3MoeSparseMoeBlock"), "gate", "num_experts",
                 SoftmaxTopK(renormalize=None, gates_in_logits_dtype=True),
                 tiny=dict(moe_intermediate_size=16, norm_topk_prob=True), train=dict(moe_intermediate_size=128)),
    Architecture("olmoe", _block("olmoe", "OlmoeSparseMoeBlock"), "gate", "num_experts",
                 SoftmaxTopK(renormalize=None, gates_in_logits_dtype=True), tiny={}),
    Architecture("phimoe", _block("phimoe", "PhimoeSparseMoeBlock"), "router", "num_local_experts", PhiMoE(),
                 tiny={}),
    Architecture("switch_transformers", _block("switch_transformers", "SwitchTransformersSparseMLP"), "router",
                 "num_experts", SwitchTransformers(), seq2seq=True,
                 tiny=dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
                           num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, expert_capacity=64,
                           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)),
    Architecture("deepseek_v3", _block("deepseek_v3", "DeepseekV3MoE"), "gate", "n_routed_experts", DeepSeekV3(),
                 tiny=dict(num_key_value_heads=4, moe_intermediate_size=16, n_group=2, topk_group=1,
                           first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5),
                 train=dict(moe_intermediate_size=128)),
    Architecture("gpt_oss", _block("gpt_oss", "GptOssMLP"), "router", "num_local_experts", GptOss(),
                 tiny=dict(head_dim=8)),
)}
CAUSAL = [name for name, arch in SUPPORTED.items() if not arch.seq2seq]  # what `gradest run --hf` trains
_BY_BLOCK = {a.block: a for a in SUPPORTED.values()}

# Full-size configurations by name: `--hf switch-base-8` builds the architecture of google/switch-base-8 (its
# config.json: 12 + 12 layers, every second one sparse, d_model 768, d_ff 3072, 8 experts of capacity 64; 619M
# parameters) at random initialisation. transformers' own SwitchTransformersConfig() defaults differ (d_ff 2048,
# every fourth layer sparse: 317M).
NAMED = {
    "switch-base-8": ("switch_transformers", dict(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_heads=12, num_layers=12, num_decoder_layers=12,
        num_sparse_encoder_layers=6, num_sparse_decoder_layers=6, num_experts=8, expert_capacity=64,
        router_bias=False, router_jitter_noise=0.01, router_dtype="float32", dropout_rate=0.1,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
}


def supported_list() -> str:
    return ", ".join(SUPPORTED)


def architecture_of(module: nn.Module) -> Architecture | None:
    """The supported architecture whose MoE block `module` is (its class or a base class), else None."""
    for cls in type(module).__mro__:
        found = _BY_BLOCK.get(f"{cls.__module__}.{cls.__qualname__}")
        if found is not None:
            return found
    return None


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module, Architecture]]:
    """The MoE blocks gradest.hf can route in `model`: (module name, block, Architecture), in model order (an
    encoder-decoder's encoder blocks first). A model without one is refused in one line."""
    if not isinstance(model, nn.Module):
        raise GradestError(f"gradest.hf needs a torch nn.Module (a transformers model), got {type(model).__name__}")
    found = []
    for name, module in model.named_modules():
        arch = architecture_of(module)
        if arch is None:
            continue
        if not hasattr(module, arch.router) or not hasattr(module, "experts"):
            raise GradestError(f"{name} ({type(module).__name__}) lacks the `{arch.router}`/`experts` modules of "
                               f"transformers {TESTED_TRANSFORMERS[0]}.x; installed: "
                               f"{transformers_module().__version__}; valid: transformers>={TESTED_TRANSFORMERS[0]},"
                               f"<{TESTED_TRANSFORMERS[1]}")
        found.append((name, module, arch))
    if not found:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        what = type(model).__name__ + (f" (model_type '{model_type}')" if model_type else "")
        raise GradestError(f"no mixture-of-experts block that gradest.hf can route in {what}; supported "
                           f"architectures: {supported_list()}")
    return found


# -------------------------------------------------------------------------------------------------- configs
def check_setting_keys(model_type: str, settings: dict | None) -> None:
    """Config settings given from outside (`--hf-set`, a study's `hf_settings`) must be fields of the
    architecture's config: a typo would otherwise become a stray attribute that the model never reads. An unknown
    key is one line with the valid ones, the closest first."""
    if not settings:
        return
    if "model_type" in settings:
        raise GradestError("model_type is not a setting: the architecture comes from --hf NAME, --hf-config FILE or "
                           "--hf-model DIR")
    default = transformers_module().AutoConfig.for_model(model_type)
    valid = sorted({*default.to_dict(), *getattr(default, "attribute_map", {})})  # (aliases: num_experts, ...)
    for key in settings:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
            raise GradestError(f"unknown config setting '{key}' for {model_type}; valid: "
                               f"{', '.join(close + [name for name in valid if name not in close])}")


def tiny_config(model_type: str, *, k: int = 2, vocab_size: int = 100, **overrides):
    """The config of a tiny random model of a supported architecture (TINY_EXPERTS experts, k of them per token),
    with `overrides` given to the config's constructor (so that the fields it derives from them agree). A causal LM
    has no special tokens (its architecture's defaults lie outside a small vocabulary)."""
    if model_type not in SUPPORTED:
        raise GradestError(f"unknown architecture '{model_type}'; valid: {supported_list()}")
    check_setting_keys(model_type, overrides)
    arch = SUPPORTED[model_type]
    experts = {arch.experts_key: TINY_EXPERTS}
    if arch.seq2seq:
        settings = {**arch.tiny, **experts, "vocab_size": vocab_size}
    else:
        settings = {**TINY, "vocab_size": vocab_size, "num_experts_per_tok": k, **experts, **arch.tiny,
                    "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
    return transformers_module().AutoConfig.for_model(model_type, **{**settings, **overrides})


def training_config(model_type: str, **overrides):
    """The config of the model `gradest run --hf NAME` trains: the tiny one with TRAIN sizes, TRAIN_EXPERTS experts
    routed 2 per token, and `overrides` over them."""
    arch = SUPPORTED[model_type]
    return tiny_config(model_type, k=2, **{**TRAIN, arch.experts_key: TRAIN_EXPERTS, **arch.train, **overrides})


def named_config(name: str, **overrides):
    """The configuration of a full-size model listed in NAMED, with `overrides`."""
    if name not in NAMED:
        raise GradestError(f"unknown model '{name}'; valid: {', '.join(NAMED)}")
    model_type, settings = NAMED[name]
    check_setting_keys(model_type, overrides)
    return transformers_module().AutoConfig.for_model(model_type, **{**settings, **overrides})


def built_config(name: str, k: int | None = None, settings: dict | None = None):
    """The config of a model built by name: a tiny one of architecture `name` (`tiny_config`, k experts per token,
    default 2, its vocabulary the bundled text's characters) or a full-size one in NAMED (its own k: `k` is
    ignored), with `settings` over it; a bad name or setting is one line."""
    from gradest.datasets import load_shakespeare
    if name not in SUPPORTED and name not in NAMED:
        raise GradestError(f"unknown architecture '{name}'; valid: {supported_list()} (tiny random models), "
                           f"{', '.join(NAMED)} (full size, random weights)")
    try:
        if name in NAMED:
            return named_config(name, **(settings or {}))
        return tiny_config(name, k=2 if k is None else k, vocab_size=load_shakespeare().vocab_size,
                           **(settings or {}))
    except CONFIG_ERRORS as error:
        raise GradestError(f"invalid settings for {name}: {config_error(error)}") from None


def config_from_file(path: str | Path, model_type: str | None = None, settings: dict | None = None):
    """The config a transformers config.json describes, `settings` over its own fields. Its architecture is the
    file's `model_type`, else `model_type` (a file naming another is refused); it must be one gradest.hf routes."""
    path = Path(path)
    if not path.is_file():
        raise GradestError(f"no such config file: {path}; valid: a transformers config JSON (its config.json)")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise GradestError(f"cannot read the config {path}: not a JSON transformers config ({error})") from None
    if not isinstance(saved, dict):
        raise GradestError(f"{path} is not a JSON object (a transformers config.json)")
    named = saved.pop("model_type", None)
    if model_type is not None and named is not None and named != model_type:
        raise GradestError(f"--hf {model_type} but {path} is a '{named}' config")
    model_type = named or model_type
    if not isinstance(model_type, str):
        raise GradestError(f"{path} has no \"model_type\"; valid: a transformers config JSON, e.g. written by "
                           f"config.save_pretrained(dir)")
    if model_type not in SUPPORTED:
        raise GradestError(f"model_type '{model_type}' ({path}) has no mixture-of-experts block gradest.hf can "
                           f"route; valid: {supported_list()}")
    check_setting_keys(model_type, settings)
    try:
        return transformers_module().AutoConfig.for_model(model_type, **{**saved, **(settings or {})})
    except CONFIG_ERRORS as error:
        raise GradestError(f"invalid config {path}: {config_error(error)}") from None


def config_from_directory(path: str | Path, settings: dict | None = None):
    """The config of the model saved in directory `path` (`save_pretrained`), `settings` over it."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise GradestError(f"{path}/ is not a saved model (no config.json); valid: a directory written by "
                           f"model.save_pretrained(dir)")
    if settings:
        try:
            model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            model_type = None
        if isinstance(model_type, str) and model_type in SUPPORTED:
            check_setting_keys(model_type, settings)
    try:
        return transformers_module().AutoConfig.from_pretrained(path, local_files_only=True, **(settings or {}))
    except (*CONFIG_ERRORS, OSError) as error:
        raise GradestError(f"cannot load the config in {path}/: {config_error(error)}") from None


def check_config(config, where: str) -> None:
    """A config's sizes that transformers takes but its model cannot run (a shape error mid-forward, or a model
    without layers or experts), refused in one line before a model is built or anything written: every layer
    and head count, and the expert count, at least 1; the attention heads split the hidden size (unless the config
    sets head_dim) and are a multiple of the key-value heads."""
    arch = SUPPORTED.get(config.model_type)
    counts = [key for key in ("num_hidden_layers", "num_layers", "num_decoder_layers", "num_attention_heads",
                              "num_heads", "num_key_value_heads", "hidden_size", "d_model", "intermediate_size",
                              "moe_intermediate_size", *([arch.experts_key] if arch else []))
              if getattr(config, key, None) is not None]
    for key in counts:
        value = getattr(config, key)
        if not integer_at_least(1)(value):
            what = ("the model needs at least one expert" if arch and key == arch.experts_key else
                    "the model needs at least one" if "layers" in key else "a size")
            raise GradestError(f"{where}: {key}={value!r} ({what}); valid: {key} >= 1, an integer")
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None)
    if hidden and heads and getattr(config, "head_dim", None) is None and hidden % heads:
        raise GradestError(f"{where}: num_attention_heads={heads} does not divide hidden_size={hidden}; valid: "
                           + ", ".join(str(h) for h in range(1, hidden + 1) if hidden % h == 0)[:200])
    if heads and kv and heads % kv:
        raise GradestError(f"{where}: num_key_value_heads={kv} does not divide num_attention_heads={heads}; valid: "
                           f"num_key_value_heads in " + ", ".join(str(h) for h in range(1, heads + 1) if heads % h == 0))


# --------------------------------------------------------------------------------------------------- models
def model_from_config(config) -> nn.Module:
    """A randomly initialised model of `config`: a causal LM, or Switch's encoder-decoder."""
    transformers = transformers_module()
    if config.model_type == "switch_transformers":
        return transformers.SwitchTransformersForConditionalGeneration(config)
    return transformers.AutoModelForCausalLM.from_config(config)


def pretrained_model(path: str | Path, config, dtype: torch.dtype | None = None) -> nn.Module:
    """The model saved in directory `path` (`from_pretrained`, local only) with `config`
    (`config_from_directory`'s), in `dtype` if given: a causal LM, or an encoder-decoder."""
    transformers = transformers_module()
    auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    try:
        return auto.from_pretrained(path, config=config, local_files_only=True,
                                    **({} if dtype is None else {"dtype": dtype}))
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise GradestError(f"cannot load the model in {path}/: {config_error(error)}") from None


def load_model(name: str | None = None, config_file: str | Path | None = None, model_dir: str | Path | None = None,
               *, k: int | None = None, seed: int = 0, dtype: torch.dtype | None = None,
               settings: dict | None = None) -> nn.Module:
    """The model the probe and `gradest doctor` run on, in eval mode: a tiny random model of architecture `name`
    (`tiny_config`, its vocabulary the bundled text's 65 characters, seeded by `seed`) or a full-size one named in
    NAMED (such as switch-base-8, random too), the same built from a config file (`config_file`: a transformers
    config.json, with `name` its model_type unless the file says), or a saved model (`model_dir`, local only). `k`
    overrides num_experts_per_tok of a built model, `settings` any of its config's fields. A model in float64 gets
    the eager experts implementation (grouped_mm refuses float64)."""
    if config_file is not None and model_dir is not None:
        raise GradestError("give --hf-config or --hf-model, not both")
    if model_dir is not None:
        if name is not None or k is not None or settings:
            raise GradestError("--hf-model DIR is a saved model: --hf, --top-k and config settings do not apply "
                               "to it")
        model = pretrained_model(model_dir, config_from_directory(model_dir))
    else:
        if config_file is not None:
            config = config_from_file(config_file, name, {**({} if k is None else {"num_experts_per_tok": k}),
                                                          **(settings or {})})
        else:
            if name is None:
                raise GradestError("which model? give --hf NAME (a tiny random model), --hf-config FILE or "
                                   "--hf-model DIR")
            if name in NAMED and k is not None:
                raise GradestError(f"{name} routes its own k experts per token; --top-k does not apply")
            config = built_config(name, k, settings)
        check_config(config, str(config_file or f"--hf {name}"))
        n = getattr(config, SUPPORTED[config.model_type].experts_key, None) if config.model_type in SUPPORTED else None
        if k is not None and isinstance(n, int) and not 1 <= k <= n:  # (before a model is built)
            raise GradestError(f"--top-k {k} does not fit the model's {n} experts; valid: 1 <= k <= {n}")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = model_from_config(config)
    if dtype is not None:
        model = model.to(dtype)
    if next(model.parameters()).dtype == torch.float64 and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    moe_blocks(model)  # refuse a model the probe cannot run, in one line
    return model.eval()

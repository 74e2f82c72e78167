"""Named training setups: the settings a run takes over from a reference implementation.

`sparsemixer-reference` is the setup of microsoft/SparseMixer's translation experiments (its `example/run_moe.sh`,
`example/moe/transformer_switch_layer.py`, `example/moe/translation_switch.py` and the routers in `sparsemixer/`),
wherever gradest's small scale allows. `sparsemixer-reference-full` adds the reference model's own architecture and
initialisation, those of fairseq's transformer (0.12.1, which `run_moe.sh` installs): a separate name because the
committed studies ran `sparsemixer-reference` as it stands, and a study cell's hash covers the settings its preset
fills. Every choice is an ordinary setting; a preset only fills in those the user did not give. The README's
"Reproducing the paper" lists each choice and what stays different, and why.
"""

from __future__ import annotations

from gradest.errors import GradestError

# The reference's load-balancing term: 0.01 x balance is added to each micro-batch's cross-entropy SUMMED over its
# target tokens, and fairseq divides the update's gradient by the target tokens of all its micro-batches. On gradest's
# mean loss the same per-token weight is 0.01 / ntokens, ntokens the mean target tokens of a micro-batch, which
# --max-tokens 8192 bounds (it counts padded positions): 0.01 / 8192 is a lower bound of the reference's weight.
REFERENCE_TOKENS_PER_BATCH = 8192
REFERENCE_BALANCE_COEF = 0.01 / REFERENCE_TOKENS_PER_BATCH

SPARSEMIXER_REFERENCE = {
    "model": {
        "balance_coef": REFERENCE_BALANCE_COEF,  # --load-balancing-alpha 0.01 on a summed loss
        # P_i from the masked softmax SparseMixer samples from; for Switch this is softmax(z), not the reference
        # SwitchGate's jittered softmax ("routed", which sparsemixer-reference-full sets)
        "balance_probs": "sampled",
        "router_bias": True,  # gating_network = nn.Linear(d, n), with its bias
        "moe_first": True,  # use_switch(layer_idx) = layer_idx % 2 == 0
        "post_ln": True,  # fairseq's default: normalize_before = False
        "dropout": 0.1,  # --dropout 0.1 --attention-dropout 0.1
        "expert_dropout": 0.1,  # --activation-dropout 0.1
    },
    "weight_decay": 0.0,  # --weight-decay 0
    "grad_clip": None,  # --clip-norm 0.0
    "adam_beta2": 0.98,  # --adam-betas '(0.9,0.98)'
    "schedule": "inverse-sqrt",  # --lr-scheduler inverse_sqrt (its 8,000 warm-up updates: see the README)
    "lr": 7e-4,  # --lr 7e-4
    "by_task": {"mt": {"label_smoothing": 0.1}},  # --label-smoothing 0.1 (its task is translation)
    # estimator hyper-parameters, by estimator: --jitter-eps 0.1 for both of its routers (SparseMixer's mask
    # width r is 0.1 by default already)
    "hparams": {"switch": {"jitter_eps": 0.1}, "sparsemixer": {"jitter_eps": 0.1}},
}

# The reference model beyond the training setup: what its Switch layer (example/moe/transformer_switch_layer.py) and
# fairseq's transformer do where run_moe.sh leaves fairseq's defaults (models/transformer/transformer_legacy.py,
# base_architecture).
REFERENCE_MODEL = {
    "activation": "relu",  # activation_fn defaults to "relu"; run_moe.sh gives no --activation-fn
    "expert_bias": True,  # build_fc1 / build_fc2: an nn.Linear(input_dim, output_dim) per expert, with its bias
    "dense_activation_dropout": 0.1,  # --activation-dropout 0.1: activation_dropout_module of every FFN, dense too
    "positions": "sinusoidal",  # encoder_learned_pos = decoder_learned_pos = False: SinusoidalPositionalEmbedding
    "embed_scale": True,  # no_scale_embedding = False: embed_scale = sqrt(embed_dim) on the token embeddings
    "init": "fairseq",  # nn.Linear defaults, MultiheadAttention.reset_parameters, Embedding's normal(0, d^-0.5)
    # sparsemixer/switchgate.py: p = softmax of the jittered logits, the balance loss's pmean = p.mean(0); for
    # SparseMixer (and every estimator routing from its objective) "routed" is "sampled", its masked softmax
    "balance_probs": "routed",
}

PRESETS: dict[str, dict] = {
    "sparsemixer-reference": SPARSEMIXER_REFERENCE,
    "sparsemixer-reference-full": {**SPARSEMIXER_REFERENCE,
                                   "model": {**SPARSEMIXER_REFERENCE["model"], **REFERENCE_MODEL}},
}

# the run settings some preset fills, which a study grouped by `preset` does not repeat in its runs' labels (its
# `model` and `hparams` tables are not among them: a variant's own model setting must still tell its runs apart)
PRESET_SETTINGS = frozenset(
    {key for preset in PRESETS.values() for key in preset if key not in ("model", "hparams", "by_task")}
    | {key for preset in PRESETS.values() for task in preset["by_task"].values() for key in task})


def apply_preset(name: str | None, settings: dict) -> dict:
    """`settings` (TrainConfig's flat settings, as given) with the preset's filled in where not given; a given
    `model` or `hparams` table is merged key by key over the preset's, whose hyper-parameters are those of the
    run's estimator (`settings["estimator"]`, a name or a spec such as `switch:jitter_eps=0.2`)."""
    if name is None:
        return settings
    if name not in PRESETS:
        raise GradestError(f"unknown preset '{name}'; valid: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    out = {key: value for key, value in preset.items() if key not in ("model", "hparams", "by_task")}
    out.update(preset["by_task"].get(settings.get("task", "lm"), {}))
    out.update(settings)
    out["model"] = {**preset["model"], **(settings.get("model") or {})}
    estimator = str(settings.get("estimator", "")).split(":")[0]
    out["hparams"] = {**preset["hparams"].get(estimator, {}), **(settings.get("hparams") or {})}
    return out

"""Named training setups: the settings a run takes over from a reference implementation.

`sparsemixer-reference` is the setup of microsoft/SparseMixer's translation experiments (its `example/run_moe.sh`,
`example/moe/transformer_switch_layer.py`, `example/moe/translation_switch.py` and the routers in `sparsemixer/`),
wherever gradest's small scale allows. Every choice is an ordinary setting; the preset only fills in those the user
did not give. The README's "Reproducing the paper" lists each choice and what stays different, and why.
"""

from __future__ import annotations

from gradest.errors import GradestError

# The reference's load-balancing term: 0.01 x balance is added to a cross-entropy SUMMED over the tokens of a
# micro-batch (at most 8192 tokens, --max-tokens), and fairseq divides the gradient by the number of tokens. On
# gradest's mean loss the same per-token weight is 0.01 / 8192.
REFERENCE_TOKENS_PER_BATCH = 8192
REFERENCE_BALANCE_COEF = 0.01 / REFERENCE_TOKENS_PER_BATCH

PRESETS: dict[str, dict] = {
    "sparsemixer-reference": {
        "model": {
            "balance_coef": REFERENCE_BALANCE_COEF,  # --load-balancing-alpha 0.01 on a summed loss
            "balance_probs": "sampled",  # P_i from the masked softmax the router samples from
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
    },
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

"""Estimators as typed: `reinforce:baseline=mean`, `--set tau=0.5`, `--estimators all`."""

from __future__ import annotations

from dataclasses import dataclass

from gradest.errors import GradestError
from gradest.estimators.base import REGISTRY, Estimator


def estimator_names() -> list[str]:
    return list(REGISTRY)


def get_estimator(name: str, **hparams) -> Estimator:
    """The estimator `name` with hyper-parameters `hparams` (validated against its `params`)."""
    if name not in REGISTRY:
        raise GradestError(f"unknown estimator '{name}'; valid: {', '.join(REGISTRY)}")
    return REGISTRY[name](**hparams)


def applicable(kind: str, k: int = 1) -> list[str]:
    """Names of the estimators defined for a problem of this kind with k experts per token."""
    return [name for name, cls in REGISTRY.items() if kind in cls.applies_to and (k == 1 or cls.supports_topk)]


def trainable(kind: str, k: int = 1) -> list[str]:
    """Names of the estimators that can route a layer (every applicable one that does not enumerate branches)."""
    return [name for name in applicable(kind, k) if not REGISTRY[name].enumerates]


@dataclass(frozen=True)
class EstimatorSpec:
    """An estimator name with hyper-parameters, as typed: `reinforce:baseline=mean`."""

    name: str
    hparams: tuple = ()

    def build(self, k: int, settings: dict | None = None, defaults: dict | None = None) -> Estimator:
        """The estimator, the one place every caller builds one: its own hyper-parameters, over `settings` (e.g.
        `--set`: those it declares, text read as the parameter's type), over `defaults` (e.g. the rule a Hugging
        Face model fixes), with k experts per token where it routes several."""
        cls = REGISTRY.get(self.name)
        if cls is None:
            raise GradestError(f"unknown estimator '{self.name}'; valid: {', '.join(REGISTRY)}")
        typed = {key: cls.params[key].parse(value) if isinstance(value, str) else value
                 for key, value in (settings or {}).items() if key in cls.params}
        hparams = {**(defaults or {}), **typed, **dict(self.hparams)}
        if cls.supports_topk:
            hparams["k"] = k
        return get_estimator(self.name, **hparams)


def expand_estimators(names: list[str] | str, kind: str, k: int, settings: dict | None = None,
                      defaults=None) -> list[Estimator]:
    """The estimators to measure on a problem: `all` means every one that applies, with its variants; `settings`
    (from `--set`) go to each estimator that declares them; `defaults(cls)`, if given, are the hyper-parameters an
    estimator class takes where neither its spec nor `settings` sets them."""
    settings = settings or {}
    if isinstance(names, list) and "all" in names and len(names) > 1:
        raise GradestError("'all' stands alone: give all (every estimator that applies) or a list of names without "
                           f"it, not {','.join(map(str, names))}")
    if names == "all" or names == ["all"]:
        specs = [EstimatorSpec(name, tuple(v.items())) for name in applicable(kind, k) for v in REGISTRY[name].variants]
    else:
        specs = [parse_spec(s) if isinstance(s, str) else s for s in names]
    out = []
    for spec in specs:
        cls = REGISTRY.get(spec.name)
        if cls is None:
            raise GradestError(f"unknown estimator '{spec.name}'; valid: {', '.join(REGISTRY)}, all")
        estimator = spec.build(k, settings, defaults(cls) if defaults else None)
        if k > 1 and not cls.supports_topk:
            valid = ", ".join(applicable(kind, k))
            raise GradestError(f"estimator '{spec.name}' does not support top-{k} routing; valid: {valid}")
        out.append(estimator)
    unused = [key for key in settings if not any(key in e.params for e in out)]
    if unused:
        raise GradestError(f"no chosen estimator has the hyper-parameter '{unused[0]}'; valid: "
                           + ", ".join(sorted({key for e in out for key in e.params if key != "k"})))
    return out


def parse_spec(text: str) -> EstimatorSpec:
    name, *pairs = text.strip().split(":")
    cls = REGISTRY.get(name)
    if cls is None:
        raise GradestError(f"unknown estimator '{name}'; valid: {', '.join(REGISTRY)}, all")
    settings = {}
    for pair in pairs:
        setting = parse_setting(pair, cls.params)
        repeated = [key for key in setting if key in settings]
        if repeated:
            raise GradestError(f"hyper-parameter '{repeated[0]}' given twice in '{text.strip()}'; give it once")
        settings.update(setting)
    return EstimatorSpec(name, tuple(settings.items()))


def parse_setting(text: str, params: dict) -> dict:
    """`key=value` typed on the command line, with the value read as the parameter's default type."""
    if "=" not in text:
        raise GradestError(f"a setting must look like key=value, got '{text}'")
    key, value = text.split("=", 1)
    key = key.strip()
    return {key: params[key].parse(value.strip()) if key in params else value.strip()}

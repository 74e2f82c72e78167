"""The estimator registry: every routing-gradient estimator of DESIGN.md §3, looked up by name."""

from gradest.errors import GradestError
from gradest.estimators import exact, reinforce, sparsemixer, straight_through, switch  # noqa: F401  (register)
from gradest.estimators.base import CATEGORICAL, GATED, REGISTRY, Estimator, Routing
from gradest.estimators.exact import exact_for

__all__ = ["CATEGORICAL", "GATED", "REGISTRY", "Estimator", "Routing", "exact_for", "get_estimator",
           "estimator_names", "applicable"]


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

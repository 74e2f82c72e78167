"""The estimator registry: every routing-gradient estimator of docs/estimators.md §3, looked up by name.

Every module of this package other than `base` and `spec` is imported here, and its `@register`ed classes join the
registry: a new estimator is one new file (docs/adding-an-estimator.md).
"""

import importlib
import pkgutil

from gradest.estimators.base import (CATEGORICAL, GATED, REGISTRY, Estimator, Objective, Param, Routing, hparam,
                                     register, unregister)
from gradest.estimators.spec import (EstimatorSpec, applicable, estimator_names, expand_estimators, get_estimator,
                                     parse_setting, parse_spec, trainable)

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "spec"):
        importlib.import_module(f"{__name__}.{_module.name}")
for _name in sorted(REGISTRY):  # listed by name, whatever order the modules registered in
    REGISTRY[_name] = REGISTRY.pop(_name)

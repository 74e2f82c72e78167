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

_modules = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in ("base", "spec"))
for _name in _modules:
    importlib.import_module(f"{__name__}.{_name}")
# listed by module, then in the order each module defines them (a module importing another registers that first)
_order = list(REGISTRY)
for _name, _cls in sorted(REGISTRY.items(), key=lambda item: (_modules.index(item[1].__module__.rsplit(".", 1)[-1])
                                                              if item[1].__module__.startswith(__name__ + ".")
                                                              else len(_modules), _order.index(item[0]))):
    REGISTRY[_name] = REGISTRY.pop(_name)

__all__ = ["CATEGORICAL", "GATED", "REGISTRY", "Estimator", "EstimatorSpec", "Objective", "Param", "Routing",
           "applicable", "estimator_names", "expand_estimators", "get_estimator", "hparam", "parse_setting",
           "parse_spec", "register", "trainable", "unregister"]

"""The executors: every module of this package registers one (`gradest.study.executor.register_executor`), and is
imported here, so a new place to run cells is one new file."""

import importlib
import pkgutil

from gradest.study.executor import DEFAULT_EXECUTOR, EXECUTORS

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
for _name in sorted(EXECUTORS, key=lambda name: (name != DEFAULT_EXECUTOR, name)):  # the default first, then by name
    EXECUTORS[_name] = EXECUTORS.pop(_name)

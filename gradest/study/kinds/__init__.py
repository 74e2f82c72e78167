"""The study kinds: every module of this package registers one (`gradest.study.kind.register_cell_kind`), and is
imported here, so a new kind of study is one new file."""

import importlib
import pkgutil

from gradest.study.kind import CELL_KINDS

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
for _name in sorted(CELL_KINDS):  # listed by name, whatever order the modules registered in
    CELL_KINDS[_name] = CELL_KINDS.pop(_name)

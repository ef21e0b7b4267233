"""Names a package exports without importing the modules that define them until they are used.

`import patchkit` and `import patchkit.core` stay free of torch (and fast) this way, while
`patchkit.evaluate` or `patchkit.method.Probe` still work. A lazy name must not also be a
submodule of its package: importing the submodule would put the module where the name was
(tests/test_api.py checks every package).
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_exports(package: str, table: dict[str, str]) -> tuple[Callable, Callable, list[str]]:
    """`__getattr__`, `__dir__` and `__all__` for `package`; `table` maps each public name to the
    module (absolute) that defines it."""

    def __getattr__(name: str):
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__, sorted(table)

"""mlx-lm's light modules, imported without mlx-lm's package import.

`import mlx_lm.<anything>` first runs mlx_lm/__init__.py, which imports mlx_lm.generate and mlx_lm.utils and
through them transformers, which imports torch where it is installed: ~1.5 s and ~200-230 MB of resident memory
that generating text does not need (its samplers and KV caches, mlx_lm.sample_utils and mlx_lm.models.cache,
import only mlx). `part("models.cache")` imports such a module with mlx_lm registered as a package whose
__init__ has not run yet: it runs on the first lookup of a name the package itself defines, so `from mlx_lm import
load` and `mlx_lm.__version__` work as ever. Where mlx_lm is already imported this is a plain import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

PACKAGE = "mlx_lm"


class _Deferred(types.ModuleType):
    """mlx_lm before its __init__ ran: the first lookup of a public name (not a dunder, which the import system
    reads) runs it, once. Any public name, not only missing ones: a submodule imported meanwhile (mlx_lm.generate)
    is bound on the package under a name __init__ rebinds (to the function `generate`)."""

    def __getattribute__(self, name: str):
        if not name.startswith("_"):
            namespace = object.__getattribute__(self, "__dict__")
            if namespace.get("_openelm_deferred_init", False):
                namespace["_openelm_deferred_init"] = False
                namespace["__spec__"].loader.exec_module(self)  # mlx_lm/__init__.py, in this module
        return super().__getattribute__(name)

    def __getattr__(self, name: str):  # a dunder __init__ defines (__version__) when looked up first
        namespace = object.__getattribute__(self, "__dict__")
        if namespace.get("_openelm_deferred_init", False):
            namespace["_openelm_deferred_init"] = False
            namespace["__spec__"].loader.exec_module(self)
            return getattr(self, name)
        raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")


def part(name: str) -> types.ModuleType:
    """mlx_lm.<name> (e.g. "models.cache", "sample_utils"), without running mlx_lm/__init__.py where mlx_lm is
    not imported yet. A module that itself imports mlx_lm.generate or transformers imports them all the same."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or spec.submodule_search_locations is None:
            raise ModuleNotFoundError(f"No module named {PACKAGE!r}", name=PACKAGE)
        package = _Deferred(PACKAGE)
        package.__spec__, package.__loader__, package.__file__ = spec, spec.loader, spec.origin
        package.__path__, package.__package__ = list(spec.submodule_search_locations), PACKAGE
        package._openelm_deferred_init = True
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{name}")

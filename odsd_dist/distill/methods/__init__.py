"""Distillation methods by name (docs/DEVELOPING.md): every module of this package that registers a
`Method` is imported here, so a new method is one new file (modules starting with `_`, `base` and
`losses` are helpers)."""
import importlib
import pkgutil

from .base import Dims, Method, build_method, known_methods, method_class, register, registry

for _m in pkgutil.iter_modules(__path__):
    if not _m.name.startswith("_") and _m.name not in ("base", "losses"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Dims", "Method", "build_method", "known_methods", "method_class", "register", "registry"]

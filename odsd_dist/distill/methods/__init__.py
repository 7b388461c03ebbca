"""Distillation methods by name (ARCHITECTURE.md's contract): `kd`, `odsd`, `ce`; later kd3/mosaickd add a class."""
from . import ce, kd, odsd  # noqa: F401  (register)
from .base import Method, build_method, known_methods, method_class, register

__all__ = ["Method", "build_method", "known_methods", "method_class", "register"]

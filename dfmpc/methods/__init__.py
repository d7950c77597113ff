"""Quantization methods, one file each; ``METHODS`` maps the names used by the API and the CLI to their classes,
taken from the one registry, :data:`dfmpc.catalog.METHOD_REGISTRY` (which also holds every description)."""
from __future__ import annotations

import inspect
from importlib import import_module

from ..catalog import METHOD_REGISTRY
from .base import QuantizationMethod

METHODS: dict[str, type[QuantizationMethod]] = {
    name: getattr(import_module(f".{entry.module}", __name__), entry.cls) for name, entry in METHOD_REGISTRY.items()}

__all__ = ["METHODS", "settings_for_model", "setting_defaults", "QuantizationMethod"]


def setting_defaults(method: str) -> dict:
    """Every setting ``method`` takes, with its default: the parameters of its constructor and of the constructors
    it passes its keyword arguments to (the one place where settings are read from a signature)."""
    out = {}
    for klass in reversed(METHODS[method].__mro__):
        if issubclass(klass, QuantizationMethod) and "__init__" in vars(klass):
            for name, p in inspect.signature(klass.__init__).parameters.items():
                if name not in ("self", "bits") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                    out[name] = p.default
    return out


def settings_for_model(method: str, spec) -> dict:
    """What ``method`` needs to know about a listed model beyond its weights (``spec``: its ModelSpec): the input
    size for a method that synthesises images (zeroq); nothing for the others."""
    return {"input_size": spec.input_size} if "input_size" in setting_defaults(method) and spec is not None else {}

"""Handlers from the user's own packages, without editing ``agents/``.

A plug-in is a function ``register(registry: HandlerRegistry) -> None`` that registers
handlers for task kinds (the kinds of the wire format), for every agent or one agent
type; what it registers replaces the built-in handler for that kind. Workers load:

1. every installed entry point of the group ``blackroad.handlers`` (in the plug-in
   package's ``pyproject.toml``: ``[project.entry-points."blackroad.handlers"]``
   ``mine = "my_package.handlers:register"``), by name;
2. then each ``module:function`` of ``BLACKROAD_HANDLERS`` (comma-separated; also
   ``blackroad worker --handlers``), in order.

A plug-in that cannot be loaded stops the worker at start-up, naming it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib import metadata

from agents.registry import HandlerRegistry

ENTRY_POINT_GROUP = "blackroad.handlers"
Register = Callable[[HandlerRegistry], None]


class PluginError(Exception):
    """A plug-in could not be found, imported or run."""


def resolve(spec: str) -> Register:
    """The function a ``module:function`` spec names."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise PluginError(f"{spec!r} is not module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"{spec!r}: cannot import {module_name}: {exc}") from None
    found = getattr(module, attribute, None)
    if not callable(found):
        raise PluginError(f"{spec!r}: {module_name} has no function {attribute}")
    register: Register = found
    return register


def load_handlers(registry: HandlerRegistry, specs: list[str]) -> list[str]:
    """Run the installed plug-ins, then ``specs``, on ``registry``; returns what was loaded."""
    plugins: list[tuple[str, Register]] = []
    for entry in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            plugins.append((f"{entry.name} ({entry.value})", entry.load()))
        except Exception as exc:  # noqa: BLE001 - any failure of a plug-in's import is reported as such
            raise PluginError(f"entry point {entry.name} ({entry.value}): {type(exc).__name__}: {exc}") from None
    plugins.extend((spec, resolve(spec)) for spec in specs)
    for name, register in plugins:
        try:
            register(registry)
        except Exception as exc:  # noqa: BLE001
            raise PluginError(f"{name} failed to register its handlers: {type(exc).__name__}: {exc}") from None
    return [name for name, _ in plugins]

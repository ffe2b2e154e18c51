"""Which handler does which task: keyed by task kind, optionally per agent type."""

from __future__ import annotations

from agents.base import Handler


class UnknownHandler(LookupError):
    """No handler is registered for a task kind."""


class HandlerRegistry:
    def __init__(self) -> None:
        self._by_kind: dict[str, Handler] = {}
        self._by_agent_type: dict[tuple[str, str], Handler] = {}

    def register(self, kind: str, handler: Handler, *, agent_type: str | None = None) -> None:
        if agent_type is None:
            self._by_kind[kind] = handler
        else:
            self._by_agent_type[(agent_type, kind)] = handler

    def resolve(self, kind: str, agent_type: str) -> Handler:
        handler = self._by_agent_type.get((agent_type, kind)) or self._by_kind.get(kind)
        if handler is None:
            raise UnknownHandler(f"no handler for task kind {kind!r} (agent type {agent_type!r})")
        return handler


def default_registry(inference_p50_ms: float = 20.0, inference_p99_ms: float = 80.0) -> HandlerRegistry:
    """The built-in handlers, one per task kind."""
    from agents import builtin

    registry = HandlerRegistry()
    registry.register("tool_execution", builtin.run_tool)
    registry.register("coordination", builtin.coordinate)
    registry.register("code_analysis", builtin.analyse_code)
    registry.register("memory_operation", builtin.memory_operation)
    registry.register("inference", builtin.SimulatedInference(inference_p50_ms, inference_p99_ms))
    return registry
